"""Triton kernels run in its interpreter on machines without a GPU. Triton reads TRITON_INTERPRET when
its own library functions (tl.sum, tl.sigmoid, ...) are defined, i.e. at its first import, which some
other import may trigger before tests/test_kernels.py runs: so it is set here, before any test module.
With CUDA the kernels are compiled and run on the GPU: tests/kernel_env.py says where and in which dtypes.

torch.compile is off for the suite (TORCH_COMPILE_DISABLE, which the engine's compile='auto' honours, and
which the servers the tests start inherit): compiling every test engine's steps would take minutes.
tests/test_compiled.py turns it back on for its own engines.

STEPFLASH_TEST_KERNELS=triton (set by benchmarks/gpu_check.sh) runs every `LLM` a test builds without
naming `kernels` on the Triton kernels with CUDA graphs, so the engine tests check that path.

The suite runs under pytest-xdist, a worker per core (pyproject's addopts; gpu_check.sh runs `-n 8` on a
GPU). On the CPU each worker takes its share of the cores for torch's threads, in the engine and server
processes its tests start too: torch would take every core in each process, and the workers' threads
would fight over them. On a GPU each worker sees its share of the card's free memory: an engine without
kv_cache_bytes takes gpu_memory_utilization (0.9) of what `torch.cuda.mem_get_info` reports, and the
first worker's engine would otherwise leave the others none."""

import os

import pytest
import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if _workers > 1:  # threads: the worker's share of the cores, in the processes its tests start too
        _threads = max(1, len(os.sched_getaffinity(0)) // _workers)
        os.environ["OMP_NUM_THREADS"] = str(_threads)
        torch.set_num_threads(_threads)
elif _workers > 1:
    _mem_get_info = torch.cuda.mem_get_info

    def _worker_share(device=None) -> tuple[int, int]:
        """What this worker may still take: its share (+1: room for the tests' own tensors) less what
        it holds, and no more than the card has free plus what its allocator keeps cached (an engine
        a test dropped leaves its cache there, for the next engine to reuse)."""
        free, total = _mem_get_info(device)
        held, cached = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        return max(0, min(free + cached - held, total // (_workers + 1) - held)), total

    torch.cuda.mem_get_info = _worker_share
os.environ["TORCH_COMPILE_DISABLE"] = "1"

import torchvision_stub  # noqa: E402,F401  (before anything imports transformers)


@pytest.fixture(autouse=True)
def _engine_kernels(monkeypatch):
    if os.environ.get("STEPFLASH_TEST_KERNELS") != "triton":
        return
    from stepflash import LLM

    init = LLM.__init__

    def with_kernels(self, *args, kernels: str = "triton", **kwargs):
        if kernels == "triton":
            kwargs.setdefault("cuda_graphs", "on")
        init(self, *args, kernels=kernels, **kwargs)

    monkeypatch.setattr(LLM, "__init__", with_kernels)
