"""The ranks of a tensor-parallel engine. Rank 0 is the engine process: `Ranks.start` spawns ranks
1..N-1 on this node (or joins the ranks `torchrun` started on several), and each step hands them the
runner's calls over the plan channel (engine/runner.py StepCall). A rank > 0 runs `serve_rank`:
join the groups, load its shard, build its runner from rank 0's KV layout, then run every call
until rank 0 says stop.

Faults: a rank that dies or hangs makes the next collective of the others fail (at once for a
death, after `distributed_timeout_s` for a hang); rank 0 then names the ranks that exited. A rank
> 0 whose rank 0 vanished fails the same way and exits; spawned ranks are daemons, joined (then
killed) when the engine shuts down, so none is left behind.
"""

import dataclasses
import os
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp

from stepflash.config import EngineConfig, LayerKind, ModelConfig
from stepflash.distributed import (Parallel, PlanChannel, device_of, init_groups, launched_by_torchrun,
                                   rendezvous, shutdown, use_expert_parallel)
from stepflash.engine.kv_cache import KVLayout
from stepflash.engine.runner import ModelRunner, StepCall
from stepflash.model.loader import load_model

STOP = {"op": "stop"}


class RankFailure(RuntimeError):
    """Another rank died or stopped answering; the engine cannot go on."""


class Ranks:
    """Rank 0's handle on the other ranks: the device group (`parallel`), the plan channel and,
    on one node, their processes."""

    def __init__(self, parallel: Parallel, channel: PlanChannel, device: torch.device,
                 processes: list[mp.Process]) -> None:
        self.parallel, self.channel, self.device, self.processes = parallel, channel, device, processes
        self.failed: RankFailure | None = None  # once a collective failed, every later step fails at once
        self.threads = torch.get_num_threads()  # this process's own, restored at close
        self._finalizer = weakref.finalize(self, _stop, channel, processes)

    @classmethod
    def start(cls, model_dir: str | Path, ec: EngineConfig) -> "Ranks":
        size, processes = ec.tensor_parallel_size, []
        if launched_by_torchrun():
            world = int(os.environ["WORLD_SIZE"])
            if world != size or int(os.environ["RANK"]) != 0:
                raise ValueError(f"torchrun started {world} ranks; tensor_parallel_size is {size}")
            store, local_rank = None, int(os.environ.get("LOCAL_RANK", 0))
        else:
            store, local_rank = rendezvous(size), 0
            ctx = mp.get_context("spawn")
            processes = [ctx.Process(target=_spawned_rank, args=(rank, store.port, str(model_dir), ec),
                                     name=f"stepflash-rank{rank}", daemon=True) for rank in range(1, size)]
            for p in processes:
                p.start()
        device = device_of(ec.device, local_rank)
        threads = torch.get_num_threads()
        if device.type == "cpu" and not launched_by_torchrun():
            _share_cores(size)  # this process is a rank too, beside N - 1 others on the same cores
        try:
            parallel, channel = init_groups(0, size, store, device, ec.distributed_timeout_s,
                                            ec.enable_expert_parallel)
        except Exception as e:
            _kill(processes)
            torch.set_num_threads(threads)
            raise RankFailure(f"the {size} tensor-parallel ranks did not come up: {e}") from e
        ranks = cls(parallel, channel, device, processes)
        ranks.threads = threads
        return ranks

    def check(self) -> None:
        """Raise RankFailure, naming them, when ranks exited (or a collective failed before)."""
        if self.failed is not None:
            raise self.failed
        dead = [f"rank {i} (pid {p.pid}) exited with code {p.exitcode}"
                for i, p in enumerate(self.processes, 1) if p.exitcode is not None]
        if dead:
            raise RankFailure("tensor-parallel " + "; ".join(dead))

    def failure(self, error: BaseException) -> RankFailure:
        """A failed step's error, with what is known about the ranks (remembered: the engine is done)."""
        for p in self.processes:  # a rank that just died may not have been reaped yet
            p.join(0.5)
        try:
            self.check()
            self.failed = RankFailure(f"a tensor-parallel step failed, so the ranks are out of step (a rank hung "
                                      f"for longer than distributed_timeout_s, or failed): {type(error).__name__}: "
                                      f"{error}")
        except RankFailure as dead:
            self.failed = RankFailure(f"{dead} (the step failed: {error})")
        return self.failed

    def close(self) -> None:
        if self.failed is not None:  # the ranks may hang: no stop message, no waiting
            _kill(self.processes)
        self._finalizer()
        torch.set_num_threads(self.threads)


def _stop(channel: PlanChannel, processes: list[mp.Process], deadline_s: float = 10.0) -> None:
    """Tell the ranks to stop, join them for up to `deadline_s`, kill whatever is left."""
    try:
        if not any(p.exitcode is not None for p in processes):
            channel.send(STOP)
    except Exception:
        pass  # a rank is gone: the others fail on their own, or are killed below
    for p in processes:
        p.join(deadline_s)
    _kill(processes)
    shutdown()


def _kill(processes: list[mp.Process]) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)


def _share_cores(size: int) -> None:
    """CPU ranks on one machine: each takes its share of the cores, so that none oversubscribes them."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def _spawned_rank(rank: int, port: int, model_dir: str, ec: EngineConfig) -> None:
    if ec.device in ("auto", "cpu") and not torch.cuda.is_available():
        _share_cores(ec.tensor_parallel_size)
    serve_rank(rank, port, model_dir, ec, local_rank=rank)


def serve_rank(rank: int, port: int | None, model_dir: str | Path, ec: EngineConfig, local_rank: int) -> None:
    """A rank > 0: its shard, its runner, rank 0's calls until stop. It joins rank 0's store at
    `port` (ranks spawned on rank 0's node) or torchrun's rendezvous (None)."""
    device = device_of(ec.device, local_rank)
    ep = use_expert_parallel(ModelConfig.from_pretrained(model_dir), ec.tensor_parallel_size, ec.enable_expert_parallel)
    store = rendezvous(ec.tensor_parallel_size, port) if port else None
    parallel, channel = init_groups(rank, ec.tensor_parallel_size, store, device, ec.distributed_timeout_s, ep)
    try:
        load, _ = channel.receive()
        if load == STOP:
            return
        model = load_model(model_dir, device=device, dtype=ec.dtype, num_mtp=load["num_mtp"],
                           keep_int4=load["kernels"], keep_fp8=load["kernels"], parallel=parallel)
        kv_budget(ec, device, channel)
        setup, _ = channel.receive()
        if setup == STOP:
            return
        layout = setup["layout"]
        layout = KVLayout(**{**layout, "num_blocks": {LayerKind(k): v for k, v in layout["num_blocks"].items()}})
        runner = ModelRunner(model, layout, load["kernels"], setup["graph_rows"], setup["capture"])
        while True:
            meta, data = channel.receive()
            if meta == STOP:
                return
            call = StepCall.from_wire(meta, data)
            source, embeds = None, None
            if call.source_shape is not None:
                source = channel.share_tensor(torch.zeros(call.source_shape, dtype=torch.long, device=device))
            if call.image_rows:
                embeds = (channel.share_tensor(torch.zeros(call.image_rows, dtype=torch.long, device=device)),
                          channel.share_tensor(torch.zeros(call.image_rows, model.config.hidden_size,
                                                           dtype=runner.dtype, device=device)))
            runner.run(call, source, embeds)
    finally:
        shutdown()


def kv_budget(ec: EngineConfig, device: torch.device, channel: PlanChannel) -> EngineConfig:
    """On GPUs without a set kv_cache_bytes: gpu_memory_utilization of the free memory of the rank with
    the least (every rank runs this after loading its shard; rank 0 plans with the result)."""
    if device.type != "cuda" or ec.kv_cache_bytes is not None:
        return ec
    free = torch.tensor([int(torch.cuda.mem_get_info(device)[0] * ec.gpu_memory_utilization)], dtype=torch.int64)
    torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN, group=channel.group)
    return dataclasses.replace(ec, kv_cache_bytes=int(free))


def layout_message(layout: KVLayout, graph_rows: int, capture: bool) -> dict:
    return {"layout": dataclasses.asdict(layout), "graph_rows": graph_rows, "capture": capture}
