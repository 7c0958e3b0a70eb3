"""Tensor and expert parallelism over torch.distributed: who holds which shard, the collectives the
model calls, and the step-plan channel from rank 0 to the other ranks.

Process model (reference/parallelism.md section 6): rank 0 is the engine process (scheduler, sampler,
server). On one node it spawns ranks 1..N-1 itself; over several nodes every rank is started by
`torchrun` and ranks > 0 run the worker loop (engine/worker.py). Two groups: the device group (NCCL
on CUDA, gloo on the CPU) for the model's all-reduces and gathers, with `timeout` so that a dead or
hung rank fails the others within bounded time; and a gloo CPU group that carries each runner call
from rank 0 (JSON metadata and raw bytes, sizes first: no pickle), with a long timeout since workers wait on it
while the server is idle.

Sharding (`Parallel`): attention by heads (KV heads replicated when the ranks outnumber them),
dense MLPs and the shared expert on the intermediate dim, routed experts either on their
intermediate dim (tensor parallel inside every expert) or whole per rank (`expert_parallel`), the
embedding and LM heads on the vocabulary. Each rank's slice of a tensor starts at
`rank * (full // local) // size * local` along the one dim where its shape differs from the
checkpoint's: the loader derives every slice from the shapes of the modules built here.
"""

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stepflash.config import ModelConfig

CONTROL_TIMEOUT = timedelta(days=7)  # workers wait on the plan channel while the server idles
START_TIMEOUT = timedelta(minutes=10)  # ranks starting up (imports, a busy machine)


@dataclass(frozen=True)
class Parallel:
    """This process's place: rank of `size` tensor-parallel ranks; `expert_parallel` puts whole
    routed experts on each rank instead of a slice of every expert."""

    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: Any = field(default=None, compare=False)  # the device group

    def part(self, n: int) -> int:
        """This rank's share of a dimension split evenly (heads, intermediate, vocabulary, experts)."""
        return n // self.size

    def kv_part(self, n: int) -> int:
        """KV heads per rank: an even split, or one (replicated) when the ranks outnumber them."""
        return max(n // self.size, 1)

    def first(self, n: int) -> int:
        """Index of this rank's first element of a dimension of n split evenly."""
        return self.rank * self.part(n)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's [..., n] -> [..., size * n] in rank order (vocab-parallel logits), on every rank."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def check_shardable(cfg: ModelConfig, size: int, expert_parallel: bool) -> None:
    """Refuse, naming the dimension, a tensor_parallel_size the model cannot be split by."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    dims = {"vocab_size": cfg.vocab_size, "intermediate_size": cfg.intermediate_size}
    if cfg.share_expert_dim:
        dims["share_expert_dim"] = cfg.share_expert_dim
    if cfg.moe_num_experts:
        dims["moe_num_experts" if expert_parallel else "moe_intermediate_size"] = (
            cfg.moe_num_experts if expert_parallel else cfg.moe_intermediate_size)
    for spec in cfg.layers:
        dims[f"attention heads of layer {spec.index}"] = spec.num_heads
    for name, n in dims.items():
        if n % size:
            raise ValueError(f"tensor_parallel_size={size} does not divide {name} ({n})")
    for spec in cfg.layers:
        kv = spec.num_kv_heads
        if kv % size and size % kv:
            raise ValueError(f"tensor_parallel_size={size}: layer {spec.index} has {kv} KV heads, which "
                             f"neither divide by it nor divide it")


def use_expert_parallel(cfg: ModelConfig, size: int, asked: bool | None) -> bool:
    """The user's choice, or where they chose neither mode (None): expert parallelism when a slice of
    every expert would cut the scale blocks of quantized experts (FP8 blocks, INT4 groups along the
    intermediate dim), as the Step-3.5-Flash FP8 release's 1280 does at TP4 (320) and TP8 (160);
    else TP inside experts. Every rank decides alike from the same config."""
    if asked is not None:
        return asked
    quant = cfg.quantization_config or {}
    if not cfg.moe_num_experts or cfg.moe_num_experts % size or size == 1:
        return False
    part = cfg.moe_intermediate_size // size
    if quant.get("quant_method") == "fp8":
        block = quant.get("weight_block_size", (128, 128))
        return part % block[0] != 0 or part % block[1] != 0
    if quant.get("group_size"):
        return part % quant["group_size"] != 0
    return False


def shard_range(full: tuple[int, ...], local: tuple[int, ...], parallel: Parallel) -> tuple[int, int, int] | None:
    """(dim, start, stop) of this rank's slice of a tensor of shape `full` held as `local`, None
    when it is replicated; ValueError when the shapes are not a slice of that kind."""
    if tuple(full) == tuple(local):
        return None
    differ = [d for d, (f, l) in enumerate(zip(full, local)) if f != l]
    if len(full) != len(local) or len(differ) != 1 or parallel.size == 1:
        raise ValueError("shape mismatch")
    dim = differ[0]
    f, l = full[dim], local[dim]
    if f % l or not (f // l == parallel.size or parallel.size % (f // l) == 0):
        raise ValueError("shape mismatch")
    start = parallel.rank * (f // l) // parallel.size * l
    return dim, start, start + l


# -- process groups -----------------------------------------------------------------------------------------
def rendezvous(size: int, port: int = 0) -> dist.TCPStore:
    """The store the ranks of one node meet at. Rank 0 (port 0) hosts it on a port the OS picks
    while binding, so no other process can take that port between choosing and listening; the ranks
    it spawns join at its `port`."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=not port, timeout=START_TIMEOUT,
                         wait_for_workers=False)


def init_groups(rank: int, size: int, store: dist.Store | None, device: torch.device, timeout_s: float,
                expert_parallel: bool) -> tuple[Parallel, "PlanChannel"]:
    """Join the world at `store` (None: torchrun's environment), waiting up to START_TIMEOUT for
    every rank to come up, then make the device group (`timeout_s` on every collective) and the
    control group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, init_method=None if store else "env://", rank=rank,
                            world_size=size, timeout=max(START_TIMEOUT, timedelta(seconds=timeout_s)))
    devices = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Parallel(rank, size, expert_parallel, devices), PlanChannel(control, devices, timedelta(seconds=timeout_s))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def device_of(device: str, local_rank: int) -> torch.device:
    """One GPU per rank on CUDA (cuda:LOCAL_RANK), the CPU otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class PlanChannel:
    """Rank 0 -> every rank, over the gloo CPU group: a message of JSON metadata and a raw byte
    payload (sizes first, then the bytes; no pickle, so a peer cannot send code), and device
    tensors that exist only on rank 0 (MTP drafts) over the device group. Rank 0's sends wait at
    most `timeout` for the other ranks (a hung rank fails the step); the others wait for the
    next message as long as the server idles."""

    def __init__(self, group: Any, devices: Any, timeout: timedelta) -> None:
        self.group, self.devices, self.timeout = group, devices, timeout

    def send(self, meta: dict, data: bytes = b"") -> None:
        head = json.dumps(meta).encode()
        payload = torch.frombuffer(bytearray(head + data), dtype=torch.uint8)
        for t in (torch.tensor([len(head), len(data)], dtype=torch.int64), payload):
            dist.broadcast(t, 0, group=self.group, async_op=True).wait(self.timeout)

    def receive(self) -> tuple[dict, bytes]:
        sizes = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(sizes, 0, group=self.group)
        head, size = int(sizes[0]), int(sizes.sum())
        payload = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(payload, 0, group=self.group)
        raw = payload.numpy().tobytes()
        return json.loads(raw[:head]), raw[head:]

    def share_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank (the others pass a buffer of its shape and dtype)."""
        dist.broadcast(t, 0, group=self.devices)
        return t
