"""write_scripted_checkpoint: a tiny model whose greedy output after a trigger token is a fixed script."""

import json
from pathlib import Path

import pytest
import torch

from stepflash import LLM, SamplingParams
from stepflash.model.loader import load_model
from stepflash.train.configs import tiny_config
from scripted import write_scripted_checkpoint
from stepflash.tokenizer import MARKUP_TOKENS

SCRIPT = ["Let me check the weather.", "</think>", "\n\n", "<tool_call>",
          "\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n", "</tool_call>"]
EOS = 1
# Several sliding windows (16 tokens) long, ending in "\n".
LONG_PROMPT = "The weather in the city is sunny today, with a light wind from the west. " * 6 + "Answer:\n"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    ckpt = tmp_path_factory.mktemp("scripted")
    return ckpt, write_scripted_checkpoint(ckpt, SCRIPT)


@pytest.fixture(scope="module")
def llm(scripted: tuple[Path, list[int]]) -> LLM:
    return LLM(str(scripted[0]))


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=20, skip_special_tokens=True)


def test_script_tokens_reuse_markup_ids_and_fit_the_vocab(scripted: tuple[Path, list[int]], llm: LLM) -> None:
    ckpt, ids = scripted
    tok = llm.tokenizer
    assert len(set(ids)) == len(SCRIPT)
    assert all(i < tiny_config()["vocab_size"] for i in ids)
    for s, i in zip(SCRIPT, ids):
        assert tok.encode(s) == [i]
        assert tok.decode([i], skip_special_tokens=True) == s
    for markup in ("</think>", "<tool_call>", "</tool_call>"):
        assert ids[SCRIPT.index(markup)] == MARKUP_TOKENS.index(markup) + 4  # after the 4 control tokens
    contents = [t["content"] for t in json.loads((ckpt / "tokenizer.json").read_text())["added_tokens"]]
    assert len(contents) == len(set(contents))
    assert "Let me check the weather." in contents


def test_chat_emits_the_script_then_eos(scripted: tuple[Path, list[int]], llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "weather in Paris?"}], greedy())[0].outputs[0]
    assert out.text == "".join(SCRIPT)
    assert out.token_ids == scripted[1] + [EOS]
    assert out.finish_reason == "stop"


def test_generate_after_short_and_long_prompts(scripted: tuple[Path, list[int]], llm: LLM) -> None:
    assert len(llm.tokenizer.encode(LONG_PROMPT)) > 3 * 16
    outs = llm.generate(["Hi\n", LONG_PROMPT], greedy())
    for out in outs:
        assert out.outputs[0].text == "".join(SCRIPT)
        assert out.outputs[0].finish_reason == "stop"


def test_prompt_ending_inside_the_script_continues_it(llm: LLM) -> None:
    out = llm.generate("Question\n</think>", greedy())[0].outputs[0]
    assert out.text == "".join(SCRIPT[2:])
    assert out.finish_reason == "stop"


@torch.no_grad()
def test_hidden_states_are_embeddings_and_mtp_drafts_follow_the_script(scripted: tuple[Path, list[int]],
                                                                       llm: LLM) -> None:
    """Every block adds zero; MTP module k (chained, teacher-forced) at position t predicts the token
    k + 1 steps after t."""
    ckpt, ids = scripted
    model = load_model(ckpt)
    x = torch.tensor(llm.tokenizer.encode("Hi\n") + ids)
    start = len(x) - len(ids) - 1  # position of the trigger
    state = model(x, torch.arange(len(x)))
    assert torch.equal(state, model.model.embed_tokens(x))
    assert len(model.mtp) == 3
    for depth in range(len(model.mtp)):
        n = len(x) - depth - 1
        state, logits = model.mtp_forward(depth, x[depth + 1:], state[:n], torch.arange(n))
        drafts = logits[start:].argmax(-1)
        assert drafts.tolist() == x[start + depth + 2:].tolist() + [EOS]
        top2 = logits[start:].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 10  # a wide margin


def test_duplicate_or_trigger_script_tokens_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct"):
        write_scripted_checkpoint(tmp_path, ["a b", "</think>", "a b"])
    with pytest.raises(ValueError, match="distinct"):
        write_scripted_checkpoint(tmp_path, ["a b", "\n"])
    assert not (tmp_path / "config.json").exists()
