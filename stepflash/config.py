"""Configuration: the model's (parsed from a hub `config.json`) and the engine's (`EngineConfig`).

The published config mixes legacy names (`num_attention_groups`, `attention_other_setting`,
`moe_layers_enum`, ...) and per-layer lists that carry trailing entries for the MTP layers. This
module turns it into one validated `ModelConfig` with a `LayerSpec` per layer (decoder layers first,
then MTP layers), so the model never has to know about the file format.

`EngineConfig` is the one home of engine options: `LLM(**kwargs)` and the CLI's engine flags are
made from its fields.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("step3p5", "step3p7")


class LayerKind(str, enum.Enum):
    """An attention layer's kind; its KV lives in the pool of that kind (MTP layers are sliding)."""

    FULL = "full_attention"
    SLIDING = "sliding_attention"


FULL, SLIDING = LayerKind.FULL, LayerKind.SLIDING


class ConfigError(ValueError):
    """A config.json that stepflash cannot serve; the message names the offending field."""


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency remap (applied to full-attention layers only)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LayerSpec:
    """Everything one layer (decoder or MTP) needs to be built."""

    index: int
    attention_type: LayerKind
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rotary_dim: int
    rope_scaling: RopeScaling | None
    is_moe: bool
    swiglu_limit: float  # routed experts; 0 = no clamp
    swiglu_limit_shared: float  # shared expert / dense MLP; 0 = no clamp
    is_mtp: bool = False

    @property
    def sliding_window(self) -> bool:
        return self.attention_type == SLIDING


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_mtp_layers: int
    layers: list[LayerSpec]  # num_hidden_layers decoder layers, then num_mtp_layers MTP layers
    sliding_window: int
    rms_norm_eps: float
    max_position_embeddings: int
    moe_num_experts: int
    moe_top_k: int
    moe_intermediate_size: int
    share_expert_dim: int
    moe_router_scaling_factor: float
    use_moe_router_bias: bool
    norm_expert_weight: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    torch_dtype: str | None
    quantization_config: dict[str, Any] | None
    model_type: str = "step3p5"
    vision: VisionConfig | None = None  # Step 3.7: the vision tower, projector and image token layout
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def decoder_layers(self) -> list[LayerSpec]:
        return self.layers[: self.num_hidden_layers]

    @property
    def mtp_layers(self) -> list[LayerSpec]:
        return self.layers[self.num_hidden_layers :]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})"
            )
        if model_type == "step3p7":  # multimodal wrapper: its text decoder plus the vision tower
            text = data.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError("model_type 'step3p7' needs a 'text_config' object")
            cfg = cls.from_dict({**text, "model_type": "step3p5"})
            vision = VisionConfig.from_dict(data, cfg.hidden_size, cfg.vocab_size) if "vision_config" in data else None
            return replace(cfg, model_type="step3p7", vision=vision)
        return _parse(data)


@dataclass(frozen=True)
class VisionConfig:
    """Step 3.7's vision tower (a Perception-Encoder ViT), its two stride-2 downsampling convs, the
    projector into the text model, and the image token layout. Read from the published legacy names
    (`width`, `layers`, `heads`, `ls_init_value`) or transformers' (`hidden_size`, ...); defaults
    are the published model's."""

    hidden_size: int = 1536
    num_layers: int = 47
    num_heads: int = 16
    intermediate_size: int = 8960
    image_size: int = 728  # side of the global view; the position table is (image_size / patch_size)^2
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    projector_bias: bool = False
    text_hidden_size: int = 4096
    image_token_id: int | None = None  # None: the tokenizer's <im_patch> (checked against it when given)
    image_token_len: int = 169  # placeholders per global view
    patch_token_len: int = 81  # placeholders per local crop
    max_image_size: int = 3024  # longer sides are scaled down first (a processor constant)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def crop_size(self) -> int:
        """Side of a local crop: sqrt(patch_token_len) tokens after 4x downsampling of 14-pixel patches."""
        return math.isqrt(self.patch_token_len) * self.patch_size * DOWNSAMPLE

    @classmethod
    def from_dict(cls, data: dict[str, Any], text_hidden_size: int, vocab_size: int) -> VisionConfig:
        v = data.get("vision_config")
        if not isinstance(v, dict):
            raise ConfigError("field 'vision_config' must be an object")
        hidden = int(_first(v, "width", "hidden_size", default=cls.hidden_size))
        ratio = _first(v, "mlp_ratio", default=None)
        intermediate = int(hidden * float(ratio)) if ratio is not None else \
            int(_first(v, "intermediate_size", default=hidden * cls.intermediate_size // cls.hidden_size))
        rope = v.get("rope_parameters") or {}
        cfg = cls(
            hidden_size=hidden, num_layers=int(_first(v, "layers", "num_hidden_layers", default=cls.num_layers)),
            num_heads=int(_first(v, "heads", "num_attention_heads", default=cls.num_heads)),
            intermediate_size=intermediate, image_size=int(v.get("image_size", cls.image_size)),
            patch_size=int(v.get("patch_size", cls.patch_size)),
            layer_norm_eps=float(v.get("layer_norm_eps", cls.layer_norm_eps)),
            rope_theta=float(rope.get("rope_theta", v.get("rope_theta", cls.rope_theta))),
            projector_bias=bool(data.get("projector_bias", False)), text_hidden_size=text_hidden_size,
            image_token_id=data.get("image_token_id"),
            image_token_len=int(data.get("image_token_len", cls.image_token_len)),
            patch_token_len=int(data.get("patch_token_len", cls.patch_token_len)),
        )
        cfg._check(v, data, vocab_size)
        return cfg

    def _check(self, v: dict[str, Any], data: dict[str, Any], vocab_size: int) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size", "patch_size",
                     "image_token_len", "patch_token_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vision_config: '{name}' must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ConfigError(f"vision_config: width {self.hidden_size} over {self.num_heads} heads must give a "
                              "head_dim divisible by 4 (2-D RoPE)")
        act = v.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ConfigError(f"vision_config: hidden_act {act!r} is not supported (only 'quick_gelu')")
        for flag, want in VISION_FLAGS.items():
            if flag in v and bool(v[flag]) != want:
                raise ConfigError(f"vision_config: {flag}={v[flag]!r} is not supported (Step 3.7 has {want})")
        stride = data.get("understand_projector_stride", 2)
        if stride != 2:
            raise ConfigError(f"field 'understand_projector_stride' must be 2, got {stride!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config: image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
        if self.image_token_len != (self.image_size // (self.patch_size * DOWNSAMPLE)) ** 2:
            raise ConfigError(f"field 'image_token_len' is {self.image_token_len} but image_size {self.image_size} "
                              f"gives ({self.image_size} // ({self.patch_size} * {DOWNSAMPLE}))^2 tokens")
        if math.isqrt(self.patch_token_len) ** 2 != self.patch_token_len:
            raise ConfigError(f"field 'patch_token_len' must be a square, got {self.patch_token_len}")
        token = self.image_token_id
        if token is not None and (not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size):
            raise ConfigError(f"field 'image_token_id' {token!r} is outside the vocabulary (size {vocab_size})")


DOWNSAMPLE = 4  # two stride-2 convs after the ViT
# Perception-Encoder switches that Step 3.7 fixes (and transformers hard-codes): anything else is refused.
VISION_FLAGS = {"use_cls_token": False, "use_ln_pre": True, "use_ln_post": False, "use_abs_posemb": True,
                "use_rope2d": True}


def _require(data: dict[str, Any], name: str, kind: type | tuple[type, ...] = int) -> Any:
    if name not in data or data[name] is None:
        raise ConfigError(f"missing required field '{name}'")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"field '{name}' must be {kind}, got {value!r}")
    if isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"field '{name}' must be positive, got {value!r}")
    return value


def _first(data: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if data.get(name) is not None:
            return data[name]
    return default


def _per_layer(data: dict[str, Any], name: str, n: int, total: int, default: list[Any]) -> list[Any]:
    """A per-layer list: length `n` (decoder only; MTP entries take `default`) or `total`."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, list):
        return [value] * total
    if len(value) == total:
        return list(value)
    if len(value) == n:
        return list(value) + default[n:]
    raise ConfigError(f"field '{name}' has {len(value)} entries; expected {n} or {total}")


def _limits(data: dict[str, Any], name: str, total: int) -> list[float]:
    """swiglu clamp list: 0/null = no clamp, missing trailing entries = 0."""
    value = data.get(name) or []
    if not isinstance(value, list) or len(value) > total:
        raise ConfigError(f"field '{name}' must be a list of at most {total} numbers")
    limits = [float(v or 0) for v in value] + [0.0] * (total - len(value))
    if any(v < 0 for v in limits):
        raise ConfigError(f"field '{name}' has a negative clamp")
    return limits


def _moe_layers(data: dict[str, Any], n: int) -> set[int]:
    value = data.get("moe_layers_enum")
    if value is None:
        # transformers' default: the first three layers dense, the rest MoE
        return set(range(3, n)) if _first(data, "moe_num_experts", "n_routed_experts") else set()
    items = value.split(",") if isinstance(value, str) else value
    try:
        layers = {int(str(i).strip()) for i in items if str(i).strip()}
    except ValueError as e:
        raise ConfigError(f"field 'moe_layers_enum' must list layer indices: {e}") from e
    bad = sorted(i for i in layers if not 0 <= i < n)
    if bad:
        raise ConfigError(f"field 'moe_layers_enum' names layers {bad} outside 0..{n - 1}")
    return layers


def _rope_scaling(data: dict[str, Any]) -> RopeScaling | None:
    rs = data.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "llama3":
        raise ConfigError(f"field 'rope_scaling': rope_type {kind!r} is not supported (only 'llama3')")
    try:
        scaling = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"field 'rope_scaling' is missing {e.args[0]!r}") from e
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ConfigError("field 'rope_scaling': high_freq_factor must exceed low_freq_factor")
    return scaling


def _parse(data: dict[str, Any]) -> ModelConfig:
    hidden = _require(data, "hidden_size")
    n = _require(data, "num_hidden_layers")
    n_mtp = int(_first(data, "num_nextn_predict_layers", "num_mtp_layers", default=0))
    if n_mtp < 0:
        raise ConfigError("field 'num_nextn_predict_layers' must be >= 0")
    total = n + n_mtp

    heads = _require(data, "num_attention_heads")
    kv_heads = _first(data, "num_attention_groups", "num_key_value_heads", default=heads)
    head_dim = _first(data, "head_dim", default=hidden // heads)
    other = data.get("attention_other_setting") or {}
    sliding_heads = other.get("num_attention_heads", _first(data, "num_sliding_attention_heads", default=heads))
    sliding_kv = other.get("num_attention_groups", other.get("num_key_value_heads", kv_heads))
    sliding_head_dim = other.get("head_dim", head_dim)
    for name, q, kv in (("num_attention_heads/num_attention_groups", heads, kv_heads),
                        ("attention_other_setting", sliding_heads, sliding_kv)):
        if not (isinstance(q, int) and isinstance(kv, int) and q > 0 and kv > 0 and q % kv == 0):
            raise ConfigError(f"field '{name}': {q} query heads cannot be grouped over {kv} KV heads")

    layer_types = _per_layer(data, "layer_types", n, total, [FULL] * n + [SLIDING] * n_mtp)
    unknown = sorted({t for t in layer_types if t not in (FULL, SLIDING)})
    if unknown:
        raise ConfigError(f"field 'layer_types' has unsupported entries {unknown}")
    if SLIDING in layer_types and not data.get("sliding_window"):
        raise ConfigError("field 'sliding_window' is required when layer_types has sliding layers")
    theta_default = float(data.get("rope_theta") if isinstance(data.get("rope_theta"), (int, float)) else 1e4)
    thetas = _per_layer(data, "rope_theta", n, total, [theta_default] * total)
    factors = _per_layer(data, "partial_rotary_factors", n, total,
                         [float(data.get("partial_rotary_factor", 1.0))] * total)
    limits = _limits(data, "swiglu_limits", total)
    limits_shared = _limits(data, "swiglu_limits_shared", total)
    moe_layers = _moe_layers(data, n)
    scaling = _rope_scaling(data)
    scaled_types = data.get("yarn_only_types") or [FULL]

    layers = []
    for i in range(total):
        is_full = layer_types[i] == FULL
        q, kv, d = (heads, kv_heads, head_dim) if is_full else (sliding_heads, sliding_kv, sliding_head_dim)
        rotary_dim = int(d * float(factors[i]))
        if rotary_dim % 2 or not 0 < rotary_dim <= d:
            raise ConfigError(f"field 'partial_rotary_factors'[{i}] gives rotary dim {rotary_dim} for head_dim {d}")
        layers.append(LayerSpec(
            index=i, attention_type=LayerKind(layer_types[i]), num_heads=q, num_kv_heads=kv, head_dim=d,
            rope_theta=float(thetas[i]), rotary_dim=rotary_dim,
            rope_scaling=scaling if layer_types[i] in scaled_types else None,
            is_moe=i in moe_layers, swiglu_limit=limits[i], swiglu_limit_shared=limits_shared[i],
            is_mtp=i >= n,
        ))

    num_experts = int(_first(data, "moe_num_experts", "n_routed_experts", default=0))
    top_k = int(_first(data, "moe_top_k", "num_experts_per_tok", default=0))
    if moe_layers:
        if not 0 < top_k <= num_experts:
            raise ConfigError(f"field 'moe_top_k' ({top_k}) must be in 1..moe_num_experts ({num_experts})")
        activation = data.get("moe_router_activation", "sigmoid")
        if activation != "sigmoid":
            raise ConfigError(f"field 'moe_router_activation' {activation!r} is not supported (only 'sigmoid')")
    eos = data.get("eos_token_id")
    return ModelConfig(
        vocab_size=_require(data, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(data, "intermediate_size"),
        num_hidden_layers=n,
        num_mtp_layers=n_mtp,
        layers=layers,
        sliding_window=int(data.get("sliding_window") or 0),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(_first(data, "max_position_embeddings", "max_seq_len", default=4096)),
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        moe_intermediate_size=int(data.get("moe_intermediate_size", 0)),
        share_expert_dim=int(_first(data, "share_expert_dim", "share_expert_dims", default=0)),
        moe_router_scaling_factor=float(data.get("moe_router_scaling_factor", 1.0)),
        use_moe_router_bias=bool(data.get("use_moe_router_bias", True)),
        norm_expert_weight=bool(data.get("norm_expert_weight", True)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        bos_token_id=data.get("bos_token_id"),
        eos_token_ids=[] if eos is None else (list(eos) if isinstance(eos, list) else [eos]),
        torch_dtype=_first(data, "torch_dtype", "dtype"),
        quantization_config=data.get("quantization_config"),
        raw=data,
    )


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EngineConfig:
    """Engine options (vLLM's names). `None` means: chosen by the engine (see each help)."""

    device: str = _option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = _option("auto", "compute dtype; auto: float32 on the CPU, the checkpoint's dtype on a GPU",
                         ("auto", "float32", "float16", "bfloat16"))
    kv_cache_bytes: int | None = _option(None, "KV cache size in bytes (default: gpu_memory_utilization of the "
                                               "GPU memory free after loading; on the CPU what max_num_seqs full "
                                               "sequences need, at most a quarter of available memory)")
    gpu_memory_utilization: float = _option(0.9, "share of the GPU memory free after loading the model that the "
                                                 "KV cache takes, when kv_cache_bytes is not given")
    max_num_seqs: int | None = _option(None, "sequences running at once (default 64, fewer when the KV "
                                             "cache holds fewer)")
    max_model_len: int | None = _option(None, "longest prompt + output (default: the model's context, or "
                                              "what the KV cache holds)")
    max_num_batched_tokens: int | None = _option(None, "tokens computed per step, i.e. the prefill chunk "
                                                       "(default 1024, less when the KV cache is small)")
    block_size: int = _option(16, "tokens per KV block (a power of two)")
    enable_prefix_caching: bool = _option(True, "reuse the KV of earlier prompts' common prefixes")
    seed: int = _option(0, "seeds requests that bring no seed of their own")
    mtp: int | None = _option(None, "MTP drafts per step for speculative decoding, 0 to 3 (default: every "
                                    "MTP module the checkpoint holds)")
    kernels: str = _option("torch", "attention, MoE, routing, norms and FP8 GEMMs in Triton (auto: on CUDA); "
                                    "torch by default until the engine's tests pass on a GPU with them",
                           ("torch", "triton", "auto"))
    cuda_graphs: str = _option("auto", "decode/verify steps from CUDA graphs per batch bucket (auto: on "
                                       "with the kernels on CUDA; on without CUDA runs the same bucketed "
                                       "step eagerly)", ("auto", "on", "off"))
    compile: str = _option("auto", "decode, verify and MTP drafting steps through torch.compile (inductor): "
                                   "2-3x faster on the CPU, after compiling at start (about 40 s on 2 cores with "
                                   "inductor's disk cache warm, more when cold); auto: on for the CPU PyTorch "
                                   "path of one process when a C++ compiler is found and TORCH_COMPILE_DISABLE "
                                   "is not 1", ("auto", "on", "off"))
    quantization: str | None = _option(None, "not supported yet (FP8/INT4 checkpoints are read as stored)")
    tensor_parallel_size: int = _option(1, "ranks (GPUs; processes on the CPU) to shard the model over: heads, "
                                           "intermediate dims and vocabulary split, one all-reduce after attention "
                                           "and one after each FFN")
    enable_expert_parallel: bool | None = _option(None, "whole routed experts per rank instead of a slice of "
                                                         "every expert (default: only where slicing the experts "
                                                         "would cut the quantized checkpoint's scale blocks)")
    distributed_timeout_s: int = _option(300, "seconds a collective waits for another rank before the engine "
                                              "fails with an error (a rank that died or hangs)")
    limit_images_per_prompt: int = _option(8, "images one prompt may carry (vision models)")
    max_image_pixels: int = _option(50_000_000, "pixels per image (larger ones are refused from their header: "
                                                "decompression bombs)")
    max_image_tokens: int = _option(16384, "prompt tokens one image may expand to (its crops included)")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "kv_cache_bytes", "max_image_pixels",
                     "max_image_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.limit_images_per_prompt, int) or self.limit_images_per_prompt < 0:
            raise ValueError(f"limit_images_per_prompt must be >= 0, got {self.limit_images_per_prompt!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.mtp is not None and not 0 <= self.mtp:
            raise ValueError(f"mtp must be >= 0, got {self.mtp}")
        if self.quantization is not None:
            raise ValueError(f"quantization={self.quantization!r} is not supported yet")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.distributed_timeout_s < 1:
            raise ValueError(f"distributed_timeout_s must be >= 1, got {self.distributed_timeout_s!r}")

    @classmethod
    def of(cls, **options: Any) -> EngineConfig:
        """From keyword options, naming any that is not an engine option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
