"""The bundled default model: present, small, completes Python, and its MTP heads speed decoding
without changing a single greedy token."""

import json
from pathlib import Path

import pytest

from stepflash import LLM, SamplingParams
from stepflash.models import BUNDLED_MODEL, default_model_dir

@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(mtp=0)


def code_prompts(llm: LLM) -> list[list[int]]:
    """36 windows of real code (Python's json package), from 1 token to several windows, with
    shared prefixes."""
    source = (Path(json.__file__).parent / "decoder.py").read_text() + (Path(json.__file__).parent / "encoder.py").read_text()
    ids = llm.tokenizer.encode(source, add_special_tokens=False)
    lengths = [1, 3, 17, 60, 127, 128, 129, 200, 300, 420]
    prompts = [ids[(97 * i) % (len(ids) - 450):][: lengths[i % len(lengths)]] for i in range(32)]
    return prompts + [ids[:300], ids[:300] + ids[500:510], ids[:256] + ids[600:604], ids[:300]]


def test_bundled_model_is_the_default_and_small():
    assert default_model_dir() == BUNDLED_MODEL
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir() if f.is_file())
    assert size <= 40 * 2**20
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 3


def test_completes_python_plausibly(llm):
    out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    lines = out.split("\n")
    assert lines[0] == "" and lines[1].startswith("    ") and lines[1].strip()  # a new line, an indented body


def test_mtp_is_lossless_and_accepts_drafts(llm):
    prompts = code_prompts(llm)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    for k in (1, 2, 3):
        spec = LLM(mtp=k)
        assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == reference
        stats = spec.get_stats().spec
        assert stats.acceptance_rate > 0.3 and stats.mean_accepted_length > 1.3
