"""The Step-3.5-Flash network: decoder, MTP modules and the LM head, over a flat batch of tokens.

Module names mirror the hub checkpoint (`model.layers.N.self_attn.o_proj`, `...moe.gate_proj`), except
that q/k/v/g (`self_attn.qkvg_proj`) and the dense gate/up (`mlp.gate_up_proj`, `share_expert.gate_up_proj`)
are packed into one GEMM each, whose parts keep their hub names (model/linear.py PackedLinear). MTP
layer k of the checkpoint (`model.layers.{num_hidden_layers + k}`) is `mtp.k` here. Step 3.7's vision
tower and projector (model/vision.py) are `vision.*` (hub: `vision_model.*`, `vit_large_projector.*`).

Image features enter as `Embeds`: rows of the flat batch whose embeddings are image features instead
of their placeholder token's; the target and the MTP modules both take them, so drafts see what the
target saw.
"""

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.config import LayerSpec, ModelConfig
from stepflash.distributed import Parallel
from stepflash.model.attention import Attention, AttentionContext, BatchLayout
from stepflash.model.moe import MLP, MoE
from stepflash.model.norm import RMSNorm
from stepflash.model.rope import rotary_cos_sin
from stepflash.model.vision import Step3p7Vision

RopeTables = dict[tuple, tuple[torch.Tensor, torch.Tensor]]
Embeds = tuple[torch.Tensor, torch.Tensor]  # (flat rows [R], their embeddings [R, hidden])


def _rope_key(spec: LayerSpec) -> tuple:
    return (spec.rope_theta, spec.rotary_dim, spec.rope_scaling)


def rope_tables(specs: list[LayerSpec], positions: torch.Tensor) -> RopeTables:
    """cos/sin once per distinct rotary setting (full and sliding layers differ)."""
    return {key: rotary_cos_sin(positions, *key) for key in {_rope_key(s) for s in specs}}


class VocabEmbedding(nn.Embedding):
    """The token embedding, under tensor parallelism vocab-parallel: this rank's rows of the table,
    zeros for the ids of other ranks, summed over the ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: Parallel = Parallel()) -> None:
        super().__init__(parallel.part(vocab_size), hidden_size)
        self.parallel, self.first = parallel, parallel.first(vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return super().forward(ids)
        local = ids - self.first
        other = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(other, 0), self.weight).masked_fill(other[:, None], 0.0)
        return self.parallel.all_reduce(x)


class VocabHead(nn.Linear):
    """An LM head, under tensor parallelism vocab-parallel: this rank's rows, logits gathered."""

    def __init__(self, hidden_size: int, vocab_size: int, parallel: Parallel = Parallel()) -> None:
        super().__init__(hidden_size, parallel.part(vocab_size), bias=False)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.gather_last(super().forward(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)), with ffn dense or MoE + shared expert.
    Under tensor parallelism attention and ffn each give a partial sum: one all-reduce apiece."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig, parallel: Parallel = Parallel()) -> None:
        super().__init__()
        self.spec, self.parallel = spec, parallel
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = Attention(spec, h, cfg.sliding_window, cfg.rms_norm_eps, parallel)
        if spec.is_moe:
            self.moe = MoE(h, cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.moe_top_k,
                           cfg.moe_router_scaling_factor, cfg.use_moe_router_bias, cfg.norm_expert_weight,
                           spec.swiglu_limit, parallel)
            self.share_expert = (MLP(h, cfg.share_expert_dim, spec.swiglu_limit_shared, parallel)
                                 if cfg.share_expert_dim else None)
        else:
            self.mlp = MLP(h, cfg.intermediate_size, spec.swiglu_limit_shared, parallel)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, positions: torch.Tensor, rope: RopeTables,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the residual stream x and the previous block's output `delta` not yet added to it
        (None for the first block), so each residual add is fused with the norm that follows it;
        returns (x, this block's delta). The block's output is x + delta."""
        x, h = self.input_layernorm.add_norm(x, delta)
        attn = self.parallel.all_reduce(self.self_attn(h, positions, rope[_rope_key(self.spec)], ctx))
        x, h = self.post_attention_layernorm.add_norm(x, attn)
        if not self.spec.is_moe:
            return x, self.parallel.all_reduce(self.mlp(h))
        shared = self.share_expert(h) if self.share_expert is not None else None
        return x, self.parallel.all_reduce(self.moe(h, shared))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: Parallel = Parallel()) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = VocabHead(cfg.hidden_size, cfg.vocab_size, parallel)


class MTPLayer(DecoderLayer):
    """One MTP module: z = block(eh_proj([enorm(embed(token)), hnorm(h_prev)])); logits from its own head."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig, parallel: Parallel = Parallel()) -> None:
        super().__init__(spec, cfg, parallel)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)  # small: replicated
        self.shared_head = SharedHead(cfg, parallel)

    def predict(self, token_embeds: torch.Tensor, prev_hidden: torch.Tensor, positions: torch.Tensor,
                rope: RopeTables, ctx: AttentionContext) -> torch.Tensor:
        z = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(prev_hidden)], dim=-1))
        z, delta = self.forward(z, None, positions, rope, ctx)
        return z + delta


class Step3p5Model(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: Parallel = Parallel()) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
        self.layers = nn.ModuleList(DecoderLayer(spec, cfg, parallel) for spec in cfg.decoder_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Step3p5ForCausalLM(nn.Module):
    """`parallel`: this rank's shard under tensor / expert parallelism (stepflash/distributed.py);
    every rank runs the same forward on its shard and gets the whole logits."""

    def __init__(self, cfg: ModelConfig, num_mtp: int | None = None, parallel: Parallel = Parallel()) -> None:
        super().__init__()
        self.config, self.parallel = cfg, parallel
        self.model = Step3p5Model(cfg, parallel)
        self.lm_head = VocabHead(cfg.hidden_size, cfg.vocab_size, parallel)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n = cfg.num_mtp_layers if num_mtp is None else num_mtp
        self.mtp = nn.ModuleList(MTPLayer(spec, cfg, parallel) for spec in cfg.mtp_layers[:n])
        # under tensor parallelism rank 0 alone holds the vision tower: it encodes the images and
        # sends their features to the other ranks beside each call (engine/runner.py)
        self.vision = Step3p7Vision(cfg.vision) if cfg.vision and parallel.rank == 0 else None

    def embed(self, input_ids: torch.Tensor, embeds: Embeds | None = None) -> torch.Tensor:
        """Token embeddings, with the rows of `embeds` (image features) put in their places."""
        x = self.model.embed_tokens(input_ids)
        if embeds is not None:
            rows, values = embeds
            x = x.index_copy(0, rows, values.to(x.dtype))
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext | None = None, embeds: Embeds | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the last layer, *before* the final norm (what MTP chains on).
        Without a context the tokens form one whole sequence."""
        ctx = ctx or BatchLayout([input_ids.shape[0]])
        rope = rope_tables(self.config.decoder_layers, positions)
        x, delta = self.embed(input_ids, embeds), None
        for layer in self.model.layers:
            x, delta = layer(x, delta, positions, rope, ctx)
        return x + delta

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden)).float()

    def mtp_forward(self, depth: int, input_ids: torch.Tensor, prev_hidden: torch.Tensor,
                    positions: torch.Tensor, ctx: AttentionContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` (0-based) on (embedding of input_ids, prev_hidden) -> (its pre-norm output, logits).

        prev_hidden is the target's pre-norm last hidden state for depth 0, and the previous module's
        pre-norm output for deeper modules (chain style, spec section 4).
        """
        z = self.mtp_hidden(depth, input_ids, prev_hidden, positions, ctx)
        return z, self.mtp_logits(depth, z)

    def mtp_hidden(self, depth: int, input_ids: torch.Tensor, prev_hidden: torch.Tensor,
                   positions: torch.Tensor, ctx: AttentionContext | None = None,
                   embeds: Embeds | None = None) -> torch.Tensor:
        """MTP module `depth`'s pre-norm output (what the next module chains on)."""
        layer: MTPLayer = self.mtp[depth]
        ctx = ctx or BatchLayout([input_ids.shape[0]])
        rope = rope_tables([layer.spec], positions)
        return layer.predict(self.embed(input_ids, embeds), prev_hidden, positions, rope, ctx)

    def mtp_logits(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        head = self.mtp[depth].shared_head
        return head.output(head.norm(hidden)).float()


def use_kernels(model: nn.Module, on: bool) -> None:
    """Switch every module with a Triton path (fused MoE, residual + RMSNorm, FP8 GEMMs) to it or
    back to its PyTorch twin."""
    for module in model.modules():
        if hasattr(module, "use_kernel"):
            module.use_kernel = on


def active_weight_bytes(model: Step3p5ForCausalLM, per_param: int | None = None) -> int:
    """Weight bytes one decoded token reads at batch 1: every decoder weight and the head, but only
    top_k of the routed experts, and one embedding row (negligible, left out); MTP modules and the
    vision tower excluded. `per_param`: bytes counted per parameter instead of each one's own size
    (1: how many parameters)."""
    cfg, total = model.config, 0
    for name, p in model.named_parameters():
        if name.startswith(("mtp.", "vision.")) or name == "model.embed_tokens.weight":
            continue
        size = p.numel() * (per_param or p.element_size())
        if ".moe." in name and not name.endswith(("moe.gate.weight", "router_bias")):
            size = size * cfg.moe_top_k // cfg.moe_num_experts
        total += size
    return total
