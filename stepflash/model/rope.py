"""Partial NeoX-style rotary embeddings with per-layer theta and llama3 long-context remap."""

import math

import torch

from stepflash.config import RopeScaling


def inverse_frequencies(theta: float, rotary_dim: int, scaling: RopeScaling | None,
                        device: torch.device) -> torch.Tensor:
    """inv_freq_j = theta^(-2j/rd), j < rd/2 (fp32), remapped llama3-style when `scaling` is set."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    return inv_freq if scaling is None else _llama3_remap(inv_freq, scaling)


def _llama3_remap(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Keep short wavelengths, divide long ones by `factor`, interpolate smoothly in between."""
    old_len = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= old_len / s.high_freq_factor) & (wavelen <= old_len / s.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(positions: torch.Tensor, theta: float, rotary_dim: int,
                   scaling: RopeScaling | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, rotary_dim] (fp32) for the given absolute positions."""
    inv_freq = inverse_frequencies(theta, rotary_dim, scaling, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
