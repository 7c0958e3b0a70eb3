"""Hub checkpoint (safetensors only, single file or sharded) -> Step3p5ForCausalLM parameters.

Tensors are read through safetensors' memory map and moved straight to their device and dtype; the
model is built on the meta device first, so no memory is spent on initial weights. FP8 release
weights (`float8_e4m3fn` + `weight_scale_inv` per 128x128 block) and INT4 experts (`stepflash
quantize`), both described in model/quant.py, are dequantized on load, unless kept quantized for the
kernels that read them as they are: `keep_int4` keeps INT4 experts packed; `keep_fp8` keeps every FP8
weight of a linear map in FP8 (stacked experts in their StackedLinear, packed q/k/v/g and gate/up in
FP8 runs where their scale blocks stack (model/linear.py PackedLinear), other nn.Linear layers
replaced by Fp8Linear), except lm_head (the engine takes the compute dtype from it) and the fp32
router; tables such as the embeddings are dequantized either way. On the CPU under fp32 compute,
routed experts stored in bf16 or fp16 stay so (`_kept_dtype`). Tensors keep their hub names in
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
from stepflash.distributed import Parallel, shard_range
from stepflash.kernels.fp8_linear import dequantize_fp8
from stepflash.kernels.moe import dequantize_int4
from stepflash.model.linear import Fp8Linear, PackedLinear, StackedLinear
from stepflash.model.quant import INT4_METHOD, INT4_SCALE_SUFFIX
from stepflash.model.step3p5 import Step3p5ForCausalLM, VocabHead

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


class Reader:
    """Tensors from the safetensors files through their memory maps: whole, or one slice along one
    dim (a rank's shard), which reads only that slice's bytes."""

    def __init__(self, index: dict[str, Path], stack: ExitStack) -> None:
        self.index, self.stack, self.handles = index, stack, {}

    def _open(self, name: str):
        file = self.index[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(safe_open(file, framework="pt", device="cpu"))
        return self.handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._open(name).get_slice(name).get_dtype()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        if dim is None:
            return self._open(name).get_tensor(name)
        index = [slice(None)] * len(self.shape(name))
        index[dim] = slice(start, stop)
        return self._open(name).get_slice(name)[tuple(index)]


Shard = tuple[int, int, int] | None  # (dim, start, stop) of a rank's slice in a tensor's logical shape


def _check_fp8_scale(hub_name: str, reader: Reader, block: tuple[int, int]) -> str:
    """The name of an FP8 weight's `<hub_name>_scale_inv`, checked to hold one scale per block."""
    scale_name = hub_name + SCALE_SUFFIX
    if scale_name not in reader.index:
        raise CheckpointError(f"tensor {hub_name} is float8 but {scale_name} is missing")
    shape, scale_shape = reader.shape(hub_name), reader.shape(scale_name)
    rows, cols = shape[-2:]
    expected = (*shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if scale_shape != expected:
        raise CheckpointError(f"{scale_name}: shape {scale_shape} does not match "
                              f"{expected} for weight {shape} with blocks {block}")
    return scale_name


def _read_quantized(reader: Reader, name: str, scale_name: str, shard: Shard, step: int, packed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int] | None]:
    """A quantized weight's shard with the scales of its own rows/columns: the whole blocks (groups)
    that cover the slice, read with their scales, and `trim` = (dim, offset, length) that cuts the
    slice out of them once dequantized, None when the slice is whole blocks (kept as it is).
    `step`: elements one scale covers along the shard's dim; `packed`: elements per stored value."""
    if shard is None:
        return reader.read(name), reader.read(scale_name), None
    dim, start, stop = shard
    length = reader.shape(name)[dim] * packed
    first, last = start // step, -(-stop // step)
    lo, hi = first * step, min(last * step, length)
    weight = reader.read(name, dim, lo // packed, hi // packed)
    trim = None if (lo, hi) == (start, stop) else (dim, start - lo, stop - start)
    return weight, reader.read(scale_name, dim, first, last), trim


def _scale_step(dim: int, ndim: int, block: tuple[int, int]) -> int:
    """Elements along `dim` that one scale covers: a block of the last two dims, 1 along leading ones."""
    return block[dim - (ndim - 2)] if dim >= ndim - 2 else 1


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
               keep_int4: bool = False, keep_fp8: bool = False, parallel: Parallel = Parallel()) -> Step3p5ForCausalLM:
    """Build the model from `model_dir`. MTP modules load when present in the checkpoint (all of them
    unless `num_mtp` asks for fewer); asking for more than the checkpoint holds is an error. INT4
    experts are dequantized unless `keep_int4` (for the fused-MoE kernel) keeps them packed; FP8
    weights unless `keep_fp8` keeps those of linear maps in FP8 (for the FP8 GEMM and fused-MoE
    kernels; the module docstring says which).

    Under tensor parallelism (`parallel`) each tensor's slice for this rank is read from the memory
    map, never the whole tensor (distributed.py says which slice). A quantized slice that cuts
    scale blocks (FP8 128x128 blocks, INT4 groups) reads the blocks that cover it and is
    dequantized with its own rows' and columns' scales, then cut: never a shifted scale."""
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
        model = Step3p5ForCausalLM(cfg, num_mtp=num_mtp, parallel=parallel)
    tied = "lm_head.weight" if cfg.tie_word_embeddings else None
    expected = {hub: (name, part, t.shape) for hub, name, part, t in _hub_entries(model) if hub != tied}
    quant = cfg.quantization_config or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    int4_group = quant.get("group_size") if quant.get("quant_method") == INT4_METHOD else None

    loaded, unexpected = set(), []
    packed: dict[str, tuple[dict, dict]] = {}  # PackedLinear name -> its parts' weights, FP8 parts' scales
    with ExitStack() as stack:
        reader = Reader(index, stack)
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
            name, part, shape = expected[key]
            loaded.add(key)
            storage = reader.dtype(key)
            shard = _shard(key, reader, storage, shape, parallel)
            if storage == "U8" and keep_int4 and int4_group:
                if _keep_int4(model, name, key, reader, shard, shape, int4_group, device, target_dtype):
                    continue
            if storage == "F8_E4M3" and keep_fp8 and (part or _keeps_fp8(model, name)):
                scale_name = _check_fp8_scale(key, reader, block)
                step = _scale_step(shard[0], len(shape), block) if shard else 1
                weight, scale_inv, trim = _read_quantized(reader, key, scale_name, shard, step, 1)
                if trim is None:  # whole blocks: kept in FP8 with the scales of its own blocks
                    weight, scale_inv = weight.to(device), scale_inv.float().to(device)
                    if part:
                        weights, scales = packed.setdefault(name, ({}, {}))
                        weights[part], scales[part] = weight, scale_inv
                    else:
                        _keep_fp8(model, name, weight, scale_inv, block)
                    continue
            tensor = _read_weight(key, reader, storage, shard, block, int4_group)
            _check_shape(key, tensor, shape)
            tensor = tensor.to(device=device, dtype=_kept_dtype(model, name, tensor.dtype, target_dtype, device))
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


def _shard(hub_name: str, reader: Reader, storage: str, shape: torch.Size, parallel: Parallel) -> Shard:
    """This rank's slice of a checkpoint tensor (None: all of it), from the shape the model holds."""
    full = reader.shape(hub_name)
    if storage == "U8":  # INT4: two values per byte along the input dim
        full = (*full[:-1], full[-1] * 2)
    try:
        return shard_range(full, tuple(shape), parallel)
    except ValueError:
        per_rank = f" (this rank's slice of {parallel.size})" if parallel.size > 1 else ""
        raise CheckpointError(f"tensor {hub_name}: checkpoint shape {reader.shape(hub_name)}, "
                              f"model expects {tuple(shape)}{per_rank}") from None


def _read_weight(hub_name: str, reader: Reader, storage: str, shard: Shard, block: tuple[int, int],
                 int4_group: int | None) -> torch.Tensor:
    """The checkpoint tensor (this rank's slice of it) as stored, or dequantized (fp32) when it is
    INT4 or FP8."""
    if storage == "U8":
        scale_name = hub_name + INT4_SCALE_SUFFIX
        if int4_group is None or scale_name not in reader.index:
            raise CheckpointError(f"tensor {hub_name} is uint8 but the config is not {INT4_METHOD} "
                                  f"or {scale_name} is missing")
        ndim = len(reader.shape(hub_name))
        last = shard is not None and shard[0] == ndim - 1
        weight, scales, trim = _read_quantized(reader, hub_name, scale_name, shard,
                                               int4_group if last else 1, 2 if last else 1)
        return _trim(dequantize_int4(weight, scales, int4_group), trim)
    if storage == "F8_E4M3":
        scale_name = _check_fp8_scale(hub_name, reader, block)
        step = _scale_step(shard[0], len(reader.shape(hub_name)), block) if shard else 1
        weight, scale_inv, trim = _read_quantized(reader, hub_name, scale_name, shard, step, 1)
        return _trim(dequantize_fp8(weight, scale_inv.float(), block), trim)
    tensor = reader.read(hub_name, *shard) if shard else reader.read(hub_name)
    if tensor.dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"tensor {hub_name}: storage dtype {tensor.dtype} is not supported")
    return tensor


def _trim(tensor: torch.Tensor, trim: tuple[int, int, int] | None) -> torch.Tensor:
    return tensor if trim is None else tensor.narrow(*trim)


def _keeps_fp8(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the weight of a linear map that can run on FP8 as it is (LM heads
    are vocab tables, dequantized like the embeddings)."""
    module_name, _, attr = name.rpartition(".")
    if attr != "weight" or name.endswith(FP32_PARAMS):
        return False
    module = model.get_submodule(module_name)
    return isinstance(module, StackedLinear) or (isinstance(module, nn.Linear) and module.bias is None
                                                 and not isinstance(module, VocabHead))


def _keep_fp8(model: nn.Module, name: str, weight: torch.Tensor, scale_inv: torch.Tensor,
              block: tuple[int, int]) -> None:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name)
    if isinstance(module, StackedLinear):
        module.keep_fp8(weight, scale_inv, block)
    else:
        model.set_submodule(module_name, Fp8Linear(weight, scale_inv, block))


def _keep_int4(model: nn.Module, name: str, key: str, reader: Reader, shard: Shard, shape: torch.Size, group: int,
               device: torch.device, dtype: torch.dtype) -> bool:
    """Keep packed INT4 experts as they are; False when this rank's slice cuts groups (dequantized)."""
    packed_shape = reader.shape(key)
    expected = (*packed_shape[:-1], packed_shape[-1] * 2)
    scale_name = key + INT4_SCALE_SUFFIX
    if scale_name not in reader.index:
        raise CheckpointError(f"tensor {key}: {scale_name} missing")
    last = shard is not None and shard[0] == len(shape) - 1
    packed, scales, trim = _read_quantized(reader, key, scale_name, shard, group if last else 1, 2 if last else 1)
    if trim is not None:
        return False
    if tuple(packed.shape) != (*shape[:-1], shape[-1] // 2):
        raise CheckpointError(f"tensor {key}: int4 shape {tuple(packed.shape)} (expected "
                              f"{(*shape[:-1], shape[-1] // 2)} of {expected})")
    module = model.get_submodule(name.rpartition(".")[0])
    module.keep_int4(packed.to(device), scales.to(device=device, dtype=dtype), group)
    return True


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


def _kept_dtype(model: nn.Module, name: str, stored: torch.dtype, target: torch.dtype,
                device: torch.device) -> torch.dtype:
    """The dtype a tensor is kept in: the router's fp32, the compute dtype for the rest, except that on
    the CPU routed experts stored in 16 bits stay so under fp32 compute. That is exact (the MoE twin
    upcasts the experts it gathers, kernels/moe.py) and halves what a decode step reads of them;
    dense weights are upcast here: past one row, the CPU's fp32 GEMMs beat inductor's upcasting loops."""
    if name.endswith(FP32_PARAMS):
        return torch.float32
    if device.type == "cpu" and target == torch.float32 and stored in (torch.bfloat16, torch.float16) \
            and isinstance(model.get_submodule(name.rpartition(".")[0]), StackedLinear):
        return stored
    return target


def _layout(weight: torch.Tensor) -> torch.Tensor:
    """A linear map's weight on the CPU: same shape, column-major storage. CPU BLAS streams x @ W^T
    from [in, out] memory up to ~1.8x faster at decode batch sizes (benchmarks/cpu_decode.py)."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2) if weight.device.type == "cpu" else weight


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
