"""Triton kernels run in its interpreter on machines without a GPU. Triton reads TRITON_INTERPRET when
its own library functions (tl.sum, tl.sigmoid, ...) are defined, i.e. at its first import, which some
other import may trigger before tests/test_kernels.py runs: so it is set here, before any test module.
With CUDA the kernels are compiled and run on the GPU: tests/kernel_env.py says where and in which dtypes.

STEPFLASH_TEST_KERNELS=triton (set by benchmarks/gpu_check.sh) runs every `LLM` a test builds without
naming `kernels` on the Triton kernels with CUDA graphs, so the engine tests check that path.

torch.compile is off for the suite (TORCH_COMPILE_DISABLE, which the servers the tests start inherit):
a CPU engine's compiled steps then run their same functions eagerly, and compiling them for every
engine a test builds would take minutes. tests/test_compiled.py turns it on to check the compiled
steps; STEPFLASH_TEST_COMPILE=1 leaves it on for the whole suite."""

import importlib.util
import os

if os.environ.get("STEPFLASH_TEST_COMPILE") != "1":
    os.environ["TORCH_COMPILE_DISABLE"] = "1"  # read when torch._dynamo is first imported, below

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _torchvision_without_extension() -> None:
    """transformers imports torchvision whenever it is installed (the reference image processor needs
    it). PyPI's Linux torchvision wheels are CUDA builds whose C extension does not load next to a
    CPU torch, and its import then fails registering fake kernels for two of the extension's
    operators: define their schemas first, so that its Python code (resize, pad: plain torch calls)
    imports. Nothing here runs without torchvision or when its extension loads."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    extensions = [e.path for e in os.scandir(spec.submodule_search_locations[0]) if e.name.startswith("_C.")]
    try:
        torch.ops.load_library(extensions[0])
        return
    except (OSError, IndexError, RuntimeError):
        pass
    global _TORCHVISION_SCHEMAS
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        _TORCHVISION_SCHEMAS.define(schema)


_torchvision_without_extension()


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
