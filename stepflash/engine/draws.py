"""Random draws for sampling, as a function of (seed, position, purpose, token id): a counter-based
hash, not a generator's state. A token drawn for position p of a sequence is argmax(probs / E) with
E ~ Exp(1) per vocabulary entry (equivalent to sampling from probs), so a sequence's draws depend only
on its seed and positions, never on what else is in the batch, and the draws for a whole batch are a
few tensor ops (which a compiled step can run too: runner.py, plain MTP drafting)."""

import torch

# purposes of the random draws, so that no two uses share numbers
DRAW, DRAFT, ACCEPT = 1, 2, 3


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """x * m mod 2^32 for x in [0, 2^32), without int64 overflow: below 2^31, m's product with x fits
    in 63 bits; m's top bit adds x * 2^31, which mod 2^32 is x's lowest bit moved up."""
    if m < 1 << 31:
        return (x * m) & 0xFFFFFFFF
    return (x * (m - (1 << 31)) + ((x & 1) << 31)) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, purpose: int, width: int) -> torch.Tensor:
    """[R, width] uniforms in (0, 1): element j of row r is a hash of (seeds[r], positions[r],
    purpose, j). seeds/positions: int64 [R] on the device where the numbers are wanted."""
    key = _mix32((seeds & 0xFFFFFFFF) ^ _mix32((seeds >> 32) & 0xFFFFFFFF))
    key = _mix32(key ^ _mix32(positions & 0xFFFFFFFF))
    key = _mix32(key ^ purpose)
    columns = _mix32(torch.arange(width, device=seeds.device) + 0x9E3779B9)
    bits = _mix32(key[:, None] ^ columns[None, :]) >> 8  # 24 bits: exact in fp32
    return (bits.float() + 0.5) / float(1 << 24)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over the last dimension, the first on ties, as Tensor.argmax: through
    max(-1), which is documented to pick the same index and on the CPU takes 0.6x argmax's time for
    several rows (argmax's CPU kernel is not vectorized: ~8 us a row of 4096 logits)."""
    return x.max(-1).indices


def draw(probs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, purpose: int) -> torch.Tensor:
    """One token per row of unnormalised probabilities: argmax(p / E), E ~ Exp(1)."""
    noise = -uniforms(seeds, positions, purpose, probs.shape[-1]).log()
    return argmax(probs / noise)
