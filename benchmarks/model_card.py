"""Figures for a trained model's card: training curve, held-out loss and perplexity, MTP accuracy
and greedy MTP acceptance on held-out standard-library code.

Held-out files are those `stepflash train` held out (split by path hash). Teacher-forced figures
score windows of real text: next-token loss, and for each MTP depth k (chained as at inference) how
often its top-1 equals the real token k+1 steps ahead. Acceptance is measured by running the engine:
greedy decoding with k = 3 drafts from held-out prompts, counting accepted drafts per position.

    pip install matplotlib && python benchmarks/model_card.py --model stepflash/models/tiny
"""

import argparse
import json
import math
import sysconfig
from pathlib import Path

import torch

from stepflash import LLM, SamplingParams
from stepflash.model.loader import load_model
from stepflash.tokenizer import Tokenizer
from stepflash.train.tokenizer import corpus_files
from stepflash.train.trainer import TRAINING_LOG, split_files


def heldout_token_ids(tokenizer: Tokenizer) -> list[list[int]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    _, heldout = split_files(corpus_files([stdlib], (".py",), ("site-packages",)), 0.05)
    return [tokenizer.encode(p.read_text(encoding="utf-8"), add_special_tokens=False) for p in heldout]


def windows(files: list[list[int]], length: int, count: int) -> list[list[int]]:
    """Up to `count` windows, spread over the files, each `length` tokens of one file."""
    out = []
    for ids in files:
        for start in range(0, len(ids) - length, max(length, len(ids) // 4)):
            out.append(ids[start:start + length])
    step = max(1, len(out) // count)
    return out[::step][:count]


@torch.inference_mode()
def teacher_forced(model_dir: Path, texts: list[list[int]]) -> dict:
    """Next-token loss; per MTP depth k, top-1 accuracy on the token k+1 ahead and agreement of
    MTP-1 with the target's own argmax (what greedy verification checks)."""
    model = load_model(model_dir)
    n_mtp = len(model.mtp)
    loss_sum, count = 0.0, 0
    hits, totals = [0] * n_mtp, [0] * n_mtp
    agree, agree_total = 0, 0
    for ids in texts:
        x = torch.tensor(ids)
        hidden = model(x, torch.arange(len(x)))
        logits = model.compute_logits(hidden)
        loss_sum += float(torch.nn.functional.cross_entropy(logits[:-1], x[1:], reduction="sum"))
        count += len(x) - 1
        target_next = logits.argmax(-1)  # target's prediction for position t+1
        state = hidden
        for depth in range(n_mtp):
            k = depth + 1
            n = len(x) - k
            state, mtp_logits = model.mtp_forward(depth, x[k:], state[:n], torch.arange(n))
            drafts = mtp_logits.argmax(-1)  # predicts x[t + k + 1] for index t
            hits[depth] += int((drafts[:-1] == x[k + 1:]).sum())
            totals[depth] += n - 1
            if depth == 0:  # MTP-1 at t saw x[t+1]; the target, given x[..t+1], predicts position t+2
                agree += int((drafts[:-1] == target_next[1:n]).sum())
                agree_total += n - 1
    loss = loss_sum / count
    return {"heldout_tokens": count, "heldout_loss": loss, "heldout_perplexity": math.exp(loss),
            "mtp_top1_accuracy": [h / t for h, t in zip(hits, totals)],
            "mtp1_agreement_with_target_argmax": agree / agree_total}


def engine_acceptance(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> dict:
    llm = LLM(str(model_dir), mtp=3, max_num_seqs=1)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    spec = llm.get_stats().spec
    accepted = spec.accepted_per_position
    conditional = [accepted[0] / spec.drafted_per_position[0]] + [
        accepted[i] / accepted[i - 1] if accepted[i - 1] else 0.0 for i in range(1, len(accepted))]
    return {"prompts": len(prompts), "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "verify_steps": spec.num_verify_steps, "tau": spec.mean_accepted_length,
            "acceptance_per_position": spec.acceptance_per_position,
            "acceptance_given_previous_accepted": conditional}


def plot_curve(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float], width: int = 25) -> list[float]:
        return [sum(values[max(0, i - width + 1):i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]

    fig, ax = plt.subplots(figsize=(7, 4))
    mtp = log["mtp_loss"]
    steps = range(1, len(mtp) + 1)
    main = [total - log["train_config"]["mtp_weight"] * sum(m) for total, m in zip(log["train_loss"], mtp)]
    ax.plot(steps, smooth(main), label="train: next token")
    for depth in range(len(mtp[0])):
        ax.plot(steps, smooth([m[depth] for m in mtp]), label=f"train: MTP-{depth + 1}", alpha=0.7)
    held = log["heldout_loss"]
    ax.plot([s for s, _ in held], [v for _, v in held], "k.-", label="held-out: next token")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_ylim(0, 8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_pretrained(args.model)
    files = heldout_token_ids(tokenizer)
    metrics = {"heldout_files": len(files)}
    metrics.update(teacher_forced(args.model, windows(files, args.window_len, args.windows)))
    prompts = [w[:args.window_len] for w in windows(files, args.window_len, args.prompts)]
    metrics["greedy_mtp3"] = engine_acceptance(args.model, prompts, args.max_tokens)
    log_path = args.model / TRAINING_LOG
    if log_path.is_file():
        plot_curve(json.loads(log_path.read_text()), args.model / "training_curve.png")
    (args.model / "card_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
