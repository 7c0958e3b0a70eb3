"""`stepflash` command line. For now: `stepflash generate "prompt"`.

Until the engine (paged KV cache, batching) lands, `generate` decodes greedily by re-running the
full sequence each step: exact, but quadratic; fine for the small default model.
"""

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from stepflash.config import ConfigError
from stepflash.model.loader import CheckpointError, load_model
from stepflash.model.step3p5 import Step3p5ForCausalLM
from stepflash.tokenizer import IncrementalDetokenizer, Tokenizer

BUNDLED_MODEL = Path(__file__).parent / "models" / "tiny"


def default_model_dir() -> Path:
    """The bundled model when present; otherwise a small random checkpoint written once to a cache dir."""
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    cache = Path(os.environ.get("STEPFLASH_CACHE", Path.home() / ".cache" / "stepflash")) / "random-tiny"
    if not (cache / "config.json").is_file():
        from stepflash.testing import tiny_config, write_checkpoint

        write_checkpoint(cache, tiny_config())
    return cache


@torch.no_grad()
def generate_greedy(model: Step3p5ForCausalLM, prompt_ids: list[int], max_tokens: int,
                    stop_ids: set[int]) -> Iterator[int]:
    ids = torch.tensor(prompt_ids, device=model.lm_head.weight.device)
    for _ in range(max_tokens):
        hidden = model(ids, torch.arange(len(ids), device=ids.device))
        token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        yield token
        if token in stop_ids:
            return
        ids = torch.cat([ids, ids.new_tensor([token])])


def active_weight_bytes(model: Step3p5ForCausalLM) -> int:
    """Bytes of weights one decoded token reads: all decoder weights except unselected experts."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "model.embed_tokens.weight":
            continue
        size = p.numel() * p.element_size()
        if ".moe." in name and not name.endswith(("gate.weight", "router_bias")):
            size = size * model.config.moe_top_k // model.config.moe_num_experts
        total += size
    return total


def cmd_generate(args: argparse.Namespace) -> None:
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, device=args.device, dtype=args.dtype, num_mtp=0)
    prompt_ids = tokenizer.encode(args.prompt)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + args.max_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max tokens ({args.max_tokens}) exceeds "
                         f"the model's context of {limit} tokens")
    detok = IncrementalDetokenizer(tokenizer)
    sys.stdout.write(args.prompt)
    start, count = time.perf_counter(), 0
    for token in generate_greedy(model, prompt_ids, args.max_tokens, set(tokenizer.eos_token_ids)):
        count += 1
        sys.stdout.write(detok.feed(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    seconds = time.perf_counter() - start
    gbps = active_weight_bytes(model) * count / seconds / 1e9
    print(f"[{model_dir.name}] {count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s, "
          f"{gbps:.2f} GB/s of active weights (no KV cache yet: every step re-reads the prompt)",
          file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepflash", description="Serve Step-3.5-Flash-class models fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt (greedy)")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="hub-format model directory (default: the bundled model)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"stepflash: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
