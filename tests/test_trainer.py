"""Training from scratch on a tiny synthetic Python corpus: the loss falls, the written directory is a
hub checkpoint that the loader and the transformers oracle agree on, resume equals a straight run, and
the router-bias rule evens out expert load."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from reference import reference_logits
from safetensors import safe_open

from stepflash.model.loader import load_model
from stepflash.model.moe import MoE
from stepflash.train.configs import tiny_config
from stepflash.tokenizer import Tokenizer
from checkpoints import write_byte_level_tokenizer
from stepflash.train.trainer import (
    STATE_FILE,
    TRAINING_LOG,
    TokenDataset,
    TrainConfig,
    expert_load,
    split_files,
    train,
    update_router_bias,
)

SNIPPETS = [
    "def add(a, b):\n    return a + b\n\n",
    "for i in range(10):\n    print(i)\n\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n",
    "if x > 0:\n    y = x * 2\nelse:\n    y = -x\n\n",
    "with open(path) as f:\n    data = f.read()\n\n",
]
FAST = {"batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 10, "log_every": 20}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """(tokenizer dir, 8 'files' of token ids, each 20 random snippets)."""
    tok_dir = tmp_path_factory.mktemp("tok")
    write_byte_level_tokenizer(tok_dir, tiny_config()["vocab_size"])
    tok, rng = Tokenizer.from_pretrained(tok_dir), random.Random(0)
    return tok_dir, [tok.encode("".join(rng.choice(SNIPPETS) for _ in range(20))) for _ in range(8)]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tok_dir, files = corpus
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(steps=120, eval_every=40, checkpoint_every=120, **FAST)
    return out, train(tiny_config(), tok_dir, files[:6], files[6:], out, cfg), files[6:]


def test_training_lowers_losses(trained):
    _, result, _ = trained
    assert len(result.train_loss) == 120
    assert sum(result.train_loss[-10:]) / 10 < 0.6 * result.train_loss[0]
    for depth in range(3):
        assert result.mtp_loss[-1][depth] < 0.5 * result.mtp_loss[0][depth]
    assert [s for s, _ in result.heldout_loss] == [40, 80, 120]
    assert result.heldout_loss[-1][1] < result.heldout_loss[0][1]
    assert result.final_heldout_perplexity == pytest.approx(math.exp(result.final_heldout_loss))
    assert result.final_heldout_perplexity < 0.5 * 320  # far better than uniform over the vocab


@torch.no_grad()
def test_written_model_matches_transformers_oracle(trained):
    out, _, heldout = trained
    model = load_model(out)
    assert len(model.mtp) == 3
    ids = heldout[0][:48]
    ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
    ref = reference_logits(out, ids)
    assert (ours.log_softmax(-1) - ref.log_softmax(-1)).abs().max() < 1e-3
    nll = torch.nn.functional.cross_entropy(ours[:-1], torch.tensor(ids[1:])).item()
    assert nll < 0.5 * math.log(320)  # the trained weights were written, not a fresh init
    tok = Tokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"
    assert (out / "tokenizer_config.json").is_file()


@torch.no_grad()
def test_written_mtp_modules_draft_the_right_offsets(trained):
    """Chained as at inference (tests/test_mtp_modules.py), depth k's drafts at t are x_{t+k+1}."""
    out, _, heldout = trained
    model = load_model(out)
    x = torch.tensor(heldout[1][:64])
    state = model(x, torch.arange(len(x)))
    for k in range(1, 4):
        n = len(x) - k
        state, logits = model.mtp_forward(k - 1, x[k:], state[:n], torch.arange(n))
        drafts = logits.argmax(-1)
        assert (drafts[:-1] == x[k + 1:]).float().mean() > 0.7
        assert (drafts[:-2] == x[k + 2:]).float().mean() < 0.3  # not the next offset


def test_resume_matches_straight_run(corpus, tmp_path):
    tok_dir, files = corpus
    cfg = TrainConfig(steps=8, eval_every=4, checkpoint_every=4, **FAST)
    straight = train(tiny_config(), tok_dir, files[:6], files[6:], tmp_path / "a", cfg)
    first = train(tiny_config(), tok_dir, files[:6], files[6:], tmp_path / "b",
                  TrainConfig(**{**cfg.__dict__, "stop_at": 4}))
    assert len(first.train_loss) == 4 and (tmp_path / "b" / STATE_FILE).is_file()
    resumed = train(tiny_config(), tok_dir, files[:6], files[6:], tmp_path / "b", cfg, resume=True)
    assert len(resumed.train_loss) == 8
    for a, b in zip(straight.train_loss, resumed.train_loss):
        assert a == pytest.approx(b, abs=1e-4)
    assert resumed.final_heldout_loss == pytest.approx(straight.final_heldout_loss, abs=1e-4)
    assert straight.train_loss[-1] != straight.train_loss[0]  # the comparison covers real updates


def test_token_dataset_windows_are_contiguous_and_seeded():
    seqs = [list(range(100, 140)), list(range(5)), list(range(300, 310))]  # the short one is skipped
    data = TokenDataset(seqs, seq_len=7)
    a = data.sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(a, data.sample(64, torch.Generator().manual_seed(3)))
    assert a.shape == (64, 8)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)
    assert {int(x) // 100 for x in a[:, 0]} == {1, 3}  # both long sequences are drawn from
    assert data.windows(3)[:, 0].tolist() == [100, 108, 116]


def test_split_files_is_deterministic_by_path():
    files = [Path(f"src/file_{i}.py") for i in range(1000)]
    train_files, heldout = split_files(files, 0.2)
    assert 150 < len(heldout) < 250 and len(train_files) + len(heldout) == 1000
    assert set(split_files(list(reversed(files)), 0.2)[1]) == set(heldout)
    assert set(split_files(files[:500], 0.2)[1]) == {f for f in heldout if f in files[:500]}


def test_router_bias_evens_expert_load():
    torch.manual_seed(0)
    moe = MoE(16, 8, 8, 2, 1.0, True, True, 0.0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.zeros_(moe.router_bias)
    moe.gate.weight.data[:2] += 1.0  # experts 0 and 1 win for most tokens
    h = torch.randn(256, 16).abs()

    def load() -> torch.Tensor:
        with expert_load(moe) as loads:
            moe(h)
        return loads[moe]

    before = load()
    assert before.sum() == 256 * 2
    update_router_bias(moe, before, 0.01)
    mean = before.mean()
    assert torch.all(moe.router_bias[before > mean] < 0) and torch.all(moe.router_bias[before < mean] > 0)
    for _ in range(100):
        update_router_bias(moe, load(), 0.01)
    after = load()
    assert after.max() - after.min() < 0.5 * (before.max() - before.min())


@torch.no_grad()
def test_trained_router_bias_evens_load(trained):
    """On held-out text, each MoE layer's load is more even with the learned bias than without it."""
    out, _, heldout = trained
    model = load_model(out)
    ids = torch.tensor(heldout[0][:256])

    def spread() -> list[float]:
        with expert_load(model) as loads:
            model(ids, torch.arange(len(ids)))
        return [float(load.max() - load.min()) for load in loads.values()]

    balanced = spread()
    for layer in model.model.layers:
        if layer.spec.is_moe:
            assert layer.moe.router_bias.abs().sum() > 0
            layer.moe.router_bias.zero_()
    assert all(b < u for b, u in zip(balanced, spread()))


def test_cli_trains_then_resumes_and_the_result_generates(tmp_path, capsys):
    from stepflash import LLM, SamplingParams
    from stepflash.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    (corpus / "vendored").mkdir()
    (corpus / "vendored" / "dep.py").write_text("import os\n" * 40)
    out = tmp_path / "model"
    args = ["train", "--corpus", str(corpus), "--out", str(out), "--config", "tiny", "--vocab-size", "320",
            "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--exclude", "vendored", "--save-dtype", "bfloat16"]
    assert main([*args, "--stop-at", "3"]) == 0
    assert main(args) == 0  # resumes from step 3
    captured = capsys.readouterr()
    assert "held-out loss" in captured.out
    # vendored/ skipped: the 4 other files, split by a hash of their paths (which hold pytest's run
    # number: how many are held out varies from run to run)
    split = re.search(r"training on (\d+) files \((\d+) held out\)", captured.err)
    assert split and int(split[1]) + int(split[2]) == 4 and int(split[2]) >= 1
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    log = json.loads((out / TRAINING_LOG).read_text())
    assert len(log["train_loss"]) == 6 and log["train_config"]["save_dtype"] == "bfloat16"
    out_text = LLM(str(out)).generate(["def f1(x):"], SamplingParams(temperature=0, max_tokens=4))
    assert len(out_text[0].outputs[0].token_ids) >= 1
