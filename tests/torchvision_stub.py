"""transformers imports torchvision whenever it is installed (the reference image processor needs
it). PyPI's Linux torchvision wheels are CUDA builds whose C extension does not load next to a CPU
torch, and its import then fails registering fake kernels for two of the extension's operators:
importing this module first defines their schemas, so that its Python code (resize, pad: plain
torch calls) imports. Nothing here runs without torchvision or when its extension loads. Imported
by conftest.py and reference.py (which benchmarks import without pytest)."""

import importlib.util
import os

import torch


def _torchvision_without_extension() -> None:
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
