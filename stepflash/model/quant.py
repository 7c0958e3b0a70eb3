"""Quantized weight formats, INT4 quantization and `stepflash quantize`.

FP8, as published (Step-3.5-Flash-FP8): a float8_e4m3fn weight beside `<name>_scale_inv` (fp32), one
scale per block of the last two dims (config `weight_block_size`, 128 x 128 in the release):
W[r, c] = fp8[r, c] * scale_inv[r // block_r, c // block_c]; blocks at the edges may be partial.

INT4 (`stepflash quantize`), weight-only for the routed experts: group-wise (along the input
dimension), symmetric, one scale per group.

q = clamp(round(w / s), -8, 7) with s = max|w| / 7 over each group of `group_size` inputs; two
values per byte (q + 8; low nibble = even column). In a checkpoint, an expert weight
`...moe.{gate,up,down}_proj.weight` becomes uint8 [E, out, in / 2] beside `<name>_int4_scale`
[E, out, in / group_size], and config.json gets quantization_config = {"quant_method":
"stepflash-int4", "group_size": g}. The dequantizations are the kernels' own (`dequantize_fp8` in
kernels/fp8_linear.py, `dequantize_int4` in kernels/moe.py).
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INT4_SCALE_SUFFIX = "_int4_scale"
INT4_METHOD = "stepflash-int4"
EXPERT_SUFFIXES = (".moe.gate_proj.weight", ".moe.up_proj.weight", ".moe.down_proj.weight")


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (packed uint8 [..., out, in / 2], scales [..., out, in / group_size] fp32)."""
    rows, cols = weight.shape[-2:]
    if cols % group_size or group_size % 2:
        raise ValueError(f"input dimension {cols} is not a multiple of the group size {group_size}")
    groups = weight.float().reshape(*weight.shape[:-1], cols // group_size, group_size)
    scales = groups.abs().amax(-1).clamp(min=1e-12) / 7.0
    q = torch.clamp(torch.round(groups / scales[..., None]), -8, 7).to(torch.int16).reshape(weight.shape) + 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
    return packed, scales


def quantize_checkpoint(src: Path, dst: Path, group_size: int = 128) -> int:
    """Copy a hub-format model directory to `dst` with its routed experts in INT4; returns the
    number of tensors quantized. Everything else (attention, shared expert, dense layers, router,
    MTP modules, tokenizer files) is copied unchanged."""
    if src.resolve() == dst.resolve():
        raise ValueError("--out must differ from --model")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config']})")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    count = 0
    for file in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name.endswith(EXPERT_SUFFIXES):
                    packed, scales = quantize_int4(tensor, group_size)
                    out[name], out[name + INT4_SCALE_SUFFIX] = packed, scales.to(torch.bfloat16)
                    count += 1
                else:
                    out[name] = tensor
        save_file(out, dst / file.name, metadata={"format": "pt"})
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json",) \
                and not extra.name.endswith(".index.json"):
            shutil.copyfile(extra, dst / extra.name)
    if (src / "model.safetensors.index.json").is_file():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        weight_map = dict(index["weight_map"])
        for name, file in index["weight_map"].items():
            if name.endswith(EXPERT_SUFFIXES):
                weight_map[name + INT4_SCALE_SUFFIX] = file
        (dst / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
    config["quantization_config"] = {"quant_method": INT4_METHOD, "group_size": group_size, "bits": 4,
                                     "modules": "routed experts"}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return count
