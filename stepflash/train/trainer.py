"""Pre-training of a Step-3.5-Flash-architecture model from scratch on token-id sequences.

Loss: next-token cross-entropy plus `mtp_weight` times the cross-entropy of each MTP depth, chained
and teacher-forced as at inference (module k at position t sees the previous state at t and the
embedding of x_{t+k+1}, and predicts x_{t+k+2}). MoE load is balanced without an auxiliary loss: after
every step each router_bias moves by `router_bias_rate` towards under-loaded experts. The run is
resumable from `out_dir/trainer_state.pt` (tensors and plain values only, read with weights_only) and
ends by writing a hub-format model directory that `stepflash.model.loader.load_model` reads.
"""

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from stepflash.config import ModelConfig
from stepflash.model.attention import BatchLayout
from stepflash.model.linear import StackedLinear
from stepflash.model.loader import hub_state_dict
from stepflash.model.moe import MoE
from stepflash.model.step3p5 import Step3p5ForCausalLM

STATE_FILE = "trainer_state.pt"
TRAINING_LOG = "training_log.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
INIT_STD = 0.02


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # per MTP depth
    router_bias_rate: float = 1e-3
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100
    device: str = "cpu"
    eval_windows: int = 16  # held-out windows of seq_len + 1 tokens scored per evaluation
    log_every: int = 10
    stop_at: int | None = None  # end this run at this step; the schedule still spans `steps` (resume later)
    save_dtype: str = "float32"  # dtype of the exported weights: float32 or bfloat16


@dataclass
class TrainResult:
    train_loss: list[float] = field(default_factory=list)  # total loss per step
    mtp_loss: list[list[float]] = field(default_factory=list)  # per step, one CE per MTP depth
    heldout_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, next-token CE)
    final_heldout_loss: float = math.nan
    final_heldout_perplexity: float = math.nan


def split_files(files: list[Path], heldout_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, held-out): a file is held out when the hash of its path falls below the fraction,
    so the split does not depend on the order or number of files."""
    def bucket(path: Path) -> float:
        return int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "big") / 2**64

    heldout = [f for f in files if bucket(f) < heldout_fraction]
    return [f for f in files if bucket(f) >= heldout_fraction], heldout


class TokenDataset:
    """Random contiguous windows of seq_len + 1 tokens from sequences long enough to hold one."""

    def __init__(self, sequences: list[list[int]], seq_len: int) -> None:
        self.seq_len = seq_len
        self.sequences = [torch.tensor(s, dtype=torch.long) for s in sequences if len(s) > seq_len]
        if not self.sequences:
            raise ValueError(f"no sequence holds {seq_len + 1} tokens")
        starts = torch.tensor([len(s) - seq_len for s in self.sequences])
        self.offsets = starts.cumsum(0)  # window r lies in the first sequence with offsets > r

    def sample(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        """[batch_size, seq_len + 1], every start position of every sequence equally likely."""
        picks = torch.randint(0, int(self.offsets[-1]), (batch_size,), generator=gen)
        seqs = torch.searchsorted(self.offsets, picks, right=True)
        rows = []
        for seq, pick in zip(seqs.tolist(), picks.tolist()):
            start = pick - (int(self.offsets[seq - 1]) if seq else 0)
            rows.append(self.sequences[seq][start : start + self.seq_len + 1])
        return torch.stack(rows)

    def windows(self, limit: int) -> torch.Tensor:
        """Up to `limit` non-overlapping windows, in order: a fixed evaluation set."""
        n = self.seq_len + 1
        rows = [s[i : i + n] for s in self.sequences for i in range(0, len(s) - n + 1, n)]
        return torch.stack(rows[:limit])


def build_model(cfg: ModelConfig, seed: int) -> Step3p5ForCausalLM:
    """Fresh model: weights N(0, INIT_STD), norm offsets and router biases zero."""
    torch.manual_seed(seed)
    model = Step3p5ForCausalLM(cfg)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, StackedLinear)):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, MoE) and module.router_bias is not None:
            module.router_bias.requires_grad_(False)  # moved by the load-balancing rule, not by gradients
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "router_bias")):
            nn.init.zeros_(p)
    return model


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only (not norms or biases), and the warmup + cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))


def batch_losses(model: Step3p5ForCausalLM, windows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(next-token CE, [CE of MTP depth k for k = 1..]) of windows [B, L + 1] in one flat batch."""
    b, length = windows.shape[0], windows.shape[1] - 1
    inputs = windows[:, :length]
    hidden = model(inputs.flatten(), _positions(b, length, windows.device), BatchLayout([length] * b))
    main = F.cross_entropy(model.compute_logits(hidden), windows[:, 1:].flatten())
    state, mtp = hidden.view(b, length, -1), []
    for depth in range(len(model.mtp)):
        k, n = depth + 1, length - depth - 1
        z, logits = model.mtp_forward(depth, inputs[:, k:].flatten(), state[:, :n].flatten(0, 1),
                                      _positions(b, n, windows.device), BatchLayout([n] * b))
        mtp.append(F.cross_entropy(logits, windows[:, k + 1:].flatten()))
        state = z.view(b, n, -1)
    return main, mtp


def _positions(batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device).repeat(batch)


@contextmanager
def expert_load(model: nn.Module) -> Iterator[dict[MoE, torch.Tensor]]:
    """Counts, per MoE module, how many tokens each expert was chosen for during the block."""
    loads: dict[MoE, torch.Tensor] = {}

    def count(module: MoE, args: tuple, _out: Any) -> None:
        with torch.no_grad():
            ids, _ = module.route(args[0])
        load = torch.bincount(ids.flatten(), minlength=module.gate.weight.shape[0]).float()
        loads[module] = loads.get(module, 0) + load

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, MoE)]
    try:
        yield loads
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def update_router_bias(moe: MoE, load: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing: bias += rate * sign(mean load - load)."""
    if moe.router_bias is not None:
        moe.router_bias += rate * torch.sign(load.mean() - load).to(moe.router_bias.device)


@torch.no_grad()
def heldout_loss(model: Step3p5ForCausalLM, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token CE over the windows (every window scores the same number of tokens)."""
    model.eval()
    losses = [batch_losses(model, chunk)[0].item() for chunk in windows.split(batch_size)]
    model.train()
    return sum(loss * len(c) for loss, c in zip(losses, windows.split(batch_size))) / len(windows)


def train_step(model: Step3p5ForCausalLM, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
               windows: torch.Tensor, cfg: TrainConfig) -> tuple[float, list[float]]:
    """One optimizer step; returns (total loss, MTP CE per depth)."""
    with expert_load(model) as loads:
        main, mtp = batch_losses(model, windows)
    loss = main + cfg.mtp_weight * sum(mtp, torch.zeros((), device=main.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    for moe, load in loads.items():
        update_router_bias(moe, load, cfg.router_bias_rate)
    return loss.item(), [m.item() for m in mtp]


def save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
               step: int, gen: torch.Generator, result: TrainResult) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": step, "torch_rng": torch.get_rng_state(), "data_rng": gen.get_state(),
             "train_loss": result.train_loss, "mtp_loss": result.mtp_loss,
             "heldout_loss": [list(x) for x in result.heldout_loss]}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run killed while saving keeps the previous state


def load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
               gen: torch.Generator) -> tuple[int, TrainResult]:
    state = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    gen.set_state(state["data_rng"])
    result = TrainResult(state["train_loss"], state["mtp_loss"], [tuple(x) for x in state["heldout_loss"]])
    return state["step"], result


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_model(model: Step3p5ForCausalLM, hub_config: dict[str, Any], tokenizer_dir: Path, out_dir: Path,
                 save_dtype: str = "float32") -> None:
    """config.json, model.safetensors (hub tensor names, in `save_dtype`) and the tokenizer files into out_dir."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be one of {sorted(SAVE_DTYPES)}, got {save_dtype!r}")
    tied = model.config.tie_word_embeddings
    tensors = {name: t.detach().to(SAVE_DTYPES[save_dtype]).cpu().contiguous()
               for name, t in hub_state_dict(model).items() if not (tied and name == "lm_head.weight")}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**hub_config, "torch_dtype": save_dtype}, indent=2))
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)


def train(model_config: dict[str, Any], tokenizer_dir: Path, train_ids: list[list[int]], heldout_ids: list[list[int]],
          out_dir: Path, cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train from scratch (or resume from out_dir/trainer_state.pt) and write the model to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    model = build_model(ModelConfig.from_dict(model_config), cfg.seed).to(device).train()
    opt, sched = make_optimizer(model, cfg)
    data, gen = TokenDataset(train_ids, cfg.seq_len), torch.Generator().manual_seed(cfg.seed)
    evaluation = TokenDataset(heldout_ids, cfg.seq_len).windows(cfg.eval_windows).to(device)
    step, result = load_state(out_dir / STATE_FILE, model, opt, sched, gen) if resume else (0, TrainResult())
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    clock, tokens = time.perf_counter(), 0
    while step < end:
        loss, mtp = train_step(model, opt, sched, data.sample(cfg.batch_size, gen).to(device), cfg)
        step, tokens = step + 1, tokens + cfg.batch_size * cfg.seq_len
        result.train_loss.append(loss)
        result.mtp_loss.append(mtp)
        if step % cfg.log_every == 0 or step == end:
            rate = tokens / (time.perf_counter() - clock)
            mtp_text = " ".join(f"{m:.3f}" for m in mtp)
            print(f"step {step}/{cfg.steps} loss {loss:.4f} mtp [{mtp_text}] "
                  f"lr {sched.get_last_lr()[0]:.2e} {rate:.0f} tok/s", flush=True)
        if step % cfg.eval_every == 0 or step == end:
            result.heldout_loss.append((step, heldout_loss(model, evaluation, cfg.batch_size)))
            print(f"step {step} held-out loss {result.heldout_loss[-1][1]:.4f}", flush=True)
        if step % cfg.checkpoint_every == 0 or step == end:
            save_state(out_dir / STATE_FILE, model, opt, sched, step, gen, result)
    result.final_heldout_loss = heldout_loss(model, evaluation, cfg.batch_size)
    result.final_heldout_perplexity = math.exp(result.final_heldout_loss)
    export_model(model, model_config, tokenizer_dir, out_dir, cfg.save_dtype)
    write_training_log(out_dir / TRAINING_LOG, cfg, result)
    return result


def write_training_log(path: Path, cfg: TrainConfig, result: TrainResult) -> None:
    """The run's settings and curves as JSON: what the model card's plot and figures are made from."""
    path.write_text(json.dumps({"train_config": asdict(cfg), **asdict(result)}, indent=1))
