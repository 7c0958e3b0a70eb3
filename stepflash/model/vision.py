"""Step 3.7's vision tower and projector: pixels of a view -> rows of the text model's embeddings.

A Perception-Encoder ViT without CLS token or final norm: a patch conv, a learned absolute position
table (bilinearly resized to the view's grid), a pre-LayerNorm, pre-norm blocks with 2-D RoPE on q
and k and per-channel layer scales, a quick-GELU MLP; then two stride-2 3x3 convs (4x fewer tokens,
4x the width) and a linear projector into the text hidden size. A 728-pixel global view gives
52x52 patches -> 13x13 = 169 rows, a 504-pixel crop 36x36 -> 9x9 = 81.

Module and parameter names are the hub checkpoint's (`vision_model.transformer.resblocks.N.attn.
in_proj_weight`, `vit_large_projector.weight`), so the loader checks them like the text model's.
The fused q/k/v rows keep the hub's interleaved RoPE layout: pairs of dims (2p, 2p + 1) rotate
together, the first half of the pairs by the patch's column, the second half by its row.
"""

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def rope_2d(grid: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [grid^2, head_dim / 2] (fp32) for the pairs of a head: pair p < head_dim/4 turns by
    column * inv_freq[p], the others by row * inv_freq[p - head_dim/4]; patches row-major."""
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float, device=device) / (2 * quarter))
    pos = torch.arange(grid, device=device, dtype=torch.float)
    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)
    angles = torch.cat([cols[:, None] * inv_freq, rows[:, None] * inv_freq], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, tokens, head_dim] in the interleaved layout, rotated in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


class VisionAttention(nn.Module):
    """Non-causal self-attention over a view's patches; q/k/v fused in one projection (hub layout)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(n, tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, tokens, head_dim]
        q, k = apply_rope_2d(q, *rope), apply_rope_2d(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, tokens, width))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(width))


class VisionBlock(nn.Module):
    """h += ls_1 * attn(ln_1(h)); h += ls_2 * mlp(ln_2(h))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls_1 = LayerScale(cfg.hidden_size)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls_2 = LayerScale(cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.ls_1.gamma * self.attn(self.ln_1(x), rope)
        return x + self.ls_2.gamma * self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid, width))
        self.ln_pre = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.vit_downsampler1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)

    def position_table(self, grid: int) -> torch.Tensor:
        """[grid^2, width]: the learned table, bilinearly resized when the view's grid differs."""
        table = self.positional_embedding
        side = self.cfg.image_size // self.cfg.patch_size
        if grid == side:
            return table
        square = table.view(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, (S/patch/4)^2 (rounded up), 4 * width], rows row-major."""
        patches = self.conv1(pixels.to(self.conv1.weight.dtype))
        n, width, grid, _ = patches.shape
        x = patches.flatten(2).transpose(1, 2) + self.position_table(grid)
        x = self.ln_pre(x)
        rope = rope_2d(grid, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        for block in self.transformer.resblocks:
            x = block(x, rope)
        x = x.transpose(1, 2).reshape(n, width, grid, grid)
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)


class Step3p7Vision(nn.Module):
    """The tower and the projector: views -> rows for the text model's embeddings."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(cfg)
        self.vit_large_projector = nn.Linear(4 * cfg.hidden_size, cfg.text_hidden_size, bias=cfg.projector_bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] (one size) -> [N, tokens per view, text hidden]."""
        return self.vit_large_projector(self.vision_model(pixels))
