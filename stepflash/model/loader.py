"""Hub checkpoint (safetensors only, single file or sharded) -> Step3p5ForCausalLM parameters.

Tensors are read through safetensors' memory map and moved straight to their device and dtype; the
model is built on the meta device first, so no memory is spent on initial weights. FP8 release
weights (`float8_e4m3fn` + `weight_scale_inv` per 128x128 block) and INT4 experts (`stepflash
quantize`), both described in model/quant.py, are dequantized on load, unless kept quantized for the
kernels that read them as they are: `keep_int4` keeps INT4 experts packed; `keep_fp8` keeps every FP8
weight of a linear map in FP8 (stacked experts in their StackedLinear, packed q/k/v/g and gate/up in
FP8 runs where their scale blocks stack (model/linear.py PackedLinear), other nn.Linear layers
replaced by Fp8Linear), except lm_head (the engine takes the compute dtype from it) and the fp32
router; tables such as the embeddings are dequantized either way. Tensors keep their hub names in
every message; `hub_state_dict` maps a model back to them.
"""

import json
import math
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from stepflash.config import ModelConfig
from stepflash.kernels.fp8_linear import dequantize_fp8
from stepflash.kernels.moe import dequantize_int4
from stepflash.model.linear import Fp8Linear, PackedLinear, StackedLinear
from stepflash.model.quant import INT4_METHOD, INT4_SCALE_SUFFIX
from stepflash.model.step3p5 import Step3p5ForCausalLM

SCALE_SUFFIX = "_scale_inv"
FP32_PARAMS = (".moe.gate.weight", ".moe.router_bias")  # the router runs in fp32
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.uint8)
# Parts of multimodal checkpoints (Step 3.7) skipped when the config has no vision_config.
VISION_PREFIXES = ("vision_model.", "vit_large_projector.", "model.vision_model.", "model.multi_modal_projector.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit its config; the message names the tensor."""


def checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {pickles}: pickled checkpoints are never loaded, convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"no *.safetensors files in {model_dir}{hint}")
    index = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            index.update({name: file for name in f.keys()})
    return index


def hub_name(name: str, num_hidden_layers: int) -> str:
    """Hub name of a tensor of Step3p5ForCausalLM named `name` (MTP module k becomes layer n + k; the
    vision tower and projector lose their `vision.` prefix)."""
    if name.startswith("vision."):
        return name.removeprefix("vision.")
    if not name.startswith("mtp."):
        return name
    _, depth, rest = name.split(".", 2)
    rest = rest.replace("shared_head.", "transformer.shared_head.")
    return f"model.layers.{num_hidden_layers + int(depth)}.{rest}"


def mtp_depth(hub_name: str, num_hidden_layers: int) -> int | None:
    m = _LAYER.match(hub_name)
    return int(m.group(1)) - num_hidden_layers if m and int(m.group(1)) >= num_hidden_layers else None


def _fp8_scale(hub_name: str, weight: torch.Tensor, read, index: dict[str, Path],
              block: tuple[int, int]) -> torch.Tensor:
    """The fp32 `<hub_name>_scale_inv` of an FP8 weight, checked to hold one scale per block."""
    scale_name = hub_name + SCALE_SUFFIX
    if scale_name not in index:
        raise CheckpointError(f"tensor {hub_name} is float8 but {scale_name} is missing")
    scale_inv = read(scale_name)
    rows, cols = weight.shape[-2:]
    expected = (*weight.shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"{scale_name}: shape {tuple(scale_inv.shape)} does not match "
                              f"{expected} for weight {tuple(weight.shape)} with blocks {block}")
    return scale_inv.float()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """'auto': fp32 on CPU (exact and fast enough for small models), the checkpoint's dtype on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        name = cfg.torch_dtype if cfg.torch_dtype in ("float16", "bfloat16", "float32") else "bfloat16"
        return getattr(torch, name)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype {dtype!r} is not supported (use auto, float32, float16 or bfloat16)")
    return getattr(torch, dtype)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = "auto", num_mtp: int | None = None,
               keep_int4: bool = False, keep_fp8: bool = False) -> Step3p5ForCausalLM:
    """Build the model from `model_dir`. MTP modules load when present in the checkpoint (all of them
    unless `num_mtp` asks for fewer); asking for more than the checkpoint holds is an error. INT4
    experts are dequantized unless `keep_int4` (for the fused-MoE kernel) keeps them packed; FP8
    weights unless `keep_fp8` keeps those of linear maps in FP8 (for the FP8 GEMM and fused-MoE
    kernels; the module docstring says which)."""
    model_dir, device = Path(model_dir), torch.device(device)
    cfg = ModelConfig.from_pretrained(model_dir)
    index = checkpoint_index(model_dir)
    n = cfg.num_hidden_layers
    available = _mtp_modules_present(index, cfg)
    if num_mtp is not None and num_mtp > available:
        raise CheckpointError(f"{num_mtp} MTP modules requested but the checkpoint holds {available}")
    num_mtp = available if num_mtp is None else num_mtp
    target_dtype = resolve_dtype(dtype, device, cfg)
    with torch.device("meta"):
        model = Step3p5ForCausalLM(cfg, num_mtp=num_mtp)
    tied = "lm_head.weight" if cfg.tie_word_embeddings else None
    expected = {hub: (name, part, t.shape) for hub, name, part, t in _hub_entries(model) if hub != tied}
    quant = cfg.quantization_config or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    int4_group = quant.get("group_size") if quant.get("quant_method") == INT4_METHOD else None

    loaded, unexpected = set(), []
    packed: dict[str, tuple[dict, dict]] = {}  # PackedLinear name -> its parts' weights, FP8 parts' scales
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def read(name: str) -> torch.Tensor:
            file = index[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            return handles[file].get_tensor(name)

        for key in sorted(index):
            depth = mtp_depth(key, n)
            if key.endswith((SCALE_SUFFIX, INT4_SCALE_SUFFIX)) or (model.vision is None and key.startswith(VISION_PREFIXES)):
                continue
            skipped_mtp = depth is not None and num_mtp <= depth < cfg.num_mtp_layers
            if skipped_mtp or key == tied:
                continue
            if key not in expected:
                unexpected.append(key)
                continue
            (name, part, shape), tensor = expected[key], read(key)
            loaded.add(key)
            if keep_int4 and int4_group and tensor.dtype == torch.uint8:
                _keep_int4(model, name, key, tensor, read, index, shape, int4_group, device, target_dtype)
                continue
            if keep_fp8 and tensor.dtype == torch.float8_e4m3fn and (part or _keeps_fp8(model, name)):
                _check_shape(key, tensor, shape)
                scale_inv = _fp8_scale(key, tensor, read, index, block).to(device)
                if part:
                    weights, scales = packed.setdefault(name, ({}, {}))
                    weights[part], scales[part] = tensor.to(device), scale_inv
                else:
                    _keep_fp8(model, name, tensor.to(device), scale_inv, block)
                continue
            tensor = _read_weight(key, tensor, read, index, block, int4_group)
            _check_shape(key, tensor, shape)
            tensor = tensor.to(device=device, dtype=torch.float32 if name.endswith(FP32_PARAMS) else target_dtype)
            if part:
                packed.setdefault(name, ({}, {}))[0][part] = tensor
            else:
                _assign(model, name, tensor)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in checkpoint: {_preview(unexpected)}")
    missing = [hub for hub in expected if hub not in loaded]
    if missing:
        raise CheckpointError(f"missing tensors in checkpoint: {_preview(missing)}")
    for name, (weights, scales) in packed.items():
        module = model.get_submodule(name)
        module.fill(weights, scales, block)
        for run in module.runs:
            if isinstance(run, nn.Linear):
                run.weight = nn.Parameter(_layout(run.weight), requires_grad=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def hub_state_dict(model: Step3p5ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their hub names, packed weights cut into their parts: what a
    checkpoint of it holds (lm_head included even when tied)."""
    return {hub: t for hub, _, _, t in _hub_entries(model)}


def _hub_entries(model: Step3p5ForCausalLM) -> Iterator[tuple[str, str, str | None, torch.Tensor]]:
    """(hub name, parameter or buffer name, None) for each tensor of the model, or (hub name, name of its
    PackedLinear, part) for each tensor of a packed part."""
    n = model.config.num_hidden_layers
    packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    for name, t in model.state_dict().items():
        owner, packed_run, _ = name.partition(".runs.")
        if not packed_run:
            yield hub_name(name, n), name, None, t
        elif owner in packed:  # a packed module's parts, once, in its place
            for key, part in packed.pop(owner).hub_tensors().items():
                yield hub_name(f"{owner.rpartition('.')[0]}.{key}", n), owner, key.partition(".")[0], part


def _check_shape(hub_name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"tensor {hub_name}: checkpoint shape {tuple(tensor.shape)}, "
                              f"model expects {tuple(shape)}")


def _read_weight(hub_name: str, tensor: torch.Tensor, read, index: dict[str, Path], block: tuple[int, int],
                 int4_group: int | None) -> torch.Tensor:
    """The checkpoint tensor as stored, or dequantized (fp32) when it is INT4 or FP8."""
    if tensor.dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"tensor {hub_name}: storage dtype {tensor.dtype} is not supported")
    if tensor.dtype == torch.uint8:
        scale_name = hub_name + INT4_SCALE_SUFFIX
        if int4_group is None or scale_name not in index:
            raise CheckpointError(f"tensor {hub_name} is uint8 but the config is not {INT4_METHOD} "
                                  f"or {scale_name} is missing")
        return dequantize_int4(tensor, read(scale_name), int4_group)
    if tensor.dtype != torch.float8_e4m3fn:
        return tensor
    return dequantize_fp8(tensor, _fp8_scale(hub_name, tensor, read, index, block), block)


def _keeps_fp8(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the weight of a linear map that can run on FP8 as it is."""
    module_name, _, attr = name.rpartition(".")
    if attr != "weight" or name == "lm_head.weight" or name.endswith(FP32_PARAMS):
        return False
    module = model.get_submodule(module_name)
    return isinstance(module, StackedLinear) or isinstance(module, nn.Linear) and module.bias is None


def _keep_fp8(model: nn.Module, name: str, weight: torch.Tensor, scale_inv: torch.Tensor,
              block: tuple[int, int]) -> None:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name)
    if isinstance(module, StackedLinear):
        module.keep_fp8(weight, scale_inv, block)
    else:
        model.set_submodule(module_name, Fp8Linear(weight, scale_inv, block))


def _keep_int4(model: nn.Module, name: str, key: str, packed: torch.Tensor, read, index: dict[str, Path],
               shape: torch.Size, group: int, device: torch.device, dtype: torch.dtype) -> None:
    expected = (*shape[:-1], shape[-1] // 2)
    scale_name = key + INT4_SCALE_SUFFIX
    if tuple(packed.shape) != expected or scale_name not in index:
        raise CheckpointError(f"tensor {key}: int4 shape {tuple(packed.shape)} (expected {expected}) or "
                              f"{scale_name} missing")
    module = model.get_submodule(name.rpartition(".")[0])
    module.keep_int4(packed.to(device), read(scale_name).to(device=device, dtype=dtype), group)


def mtp_modules_in(model_dir: str | Path) -> int:
    """How many MTP modules the checkpoint holds weights for (its config may name more)."""
    return _mtp_modules_present(checkpoint_index(Path(model_dir)), ModelConfig.from_pretrained(model_dir))


def _mtp_modules_present(index: dict[str, Path], cfg: ModelConfig) -> int:
    """Number of leading MTP modules (n, n+1, ...) with tensors in the checkpoint."""
    depths = {d for name in index if (d := mtp_depth(name, cfg.num_hidden_layers)) is not None}
    count = 0
    while count in depths and count < cfg.num_mtp_layers:
        count += 1
    return count


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, (nn.Linear, StackedLinear)) and attr == "weight":
        tensor = _layout(tensor)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _layout(weight: torch.Tensor) -> torch.Tensor:
    """A linear map's weight on the CPU: same shape, column-major storage. CPU BLAS streams x @ W^T
    from [in, out] memory up to ~1.8x faster at decode batch sizes (benchmarks/cpu_decode.py)."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2) if weight.device.type == "cpu" else weight


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
