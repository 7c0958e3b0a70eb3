"""What a sampled row draws from (the logits at its temperature, top-k / top-p / min-p applied) and
the random draws, as a function of (seed, position, purpose, token id): a counter-based hash, not a
generator's state. A token drawn for position p of a sequence is argmax(probs / E) with
E ~ Exp(1) per vocabulary entry (equivalent to sampling from probs), so a sequence's draws depend only
on its seed and positions, never on what else is in the batch, and the draws for a whole batch are a
few tensor ops (which a compiled step can run too: runner.py, plain MTP drafting; sampler.py,
plain_verify)."""

import torch

# purposes of the random draws, so that no two uses share numbers
DRAW, DRAFT, ACCEPT = 1, 2, 3
_UNIT = 2**40  # top-p sums probabilities in fixed point: exact, in any order


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


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  ranked: bool = True, floor: bool = True, sort: bool | None = None) -> torch.Tensor:
    """Mask (to -inf) per row: tokens below the k-th largest logit (top_k [R], 0 = off; ties kept),
    outside the smallest set of most likely tokens whose mass reaches top_p [R] (tokens tied with its
    least likely kept), or below min_p [R] times the most likely token's probability. `ranked` /
    `floor` False: the caller knows that no row uses top-k / top-p / min-p (so nothing is read back
    from the device to find out). The edges of top-k and top-p come from a sort of each row where
    `sort` (None: on a GPU), else by a radix select over the values' bits: on the CPU, sorting every
    row cost more than the select's eight histogram passes over it, on a GPU it is a few kernels where
    the select is many more (untested there)."""
    if ranked:
        sort = logits.is_cuda if sort is None else sort
        if sort:
            values, order = logits.sort(-1, descending=True)
            kth = values.gather(1, (top_k.clamp(1, logits.shape[-1]) - 1)[:, None])
            logits = logits.masked_fill((top_k[:, None] > 0) & (logits < kth), float("-inf"))
            probs = logits.softmax(-1)
            ordered = probs.gather(1, order)  # sorted too: softmax keeps the logits' order (no second sort)
            inside = (ordered.cumsum(-1) - ordered < top_p[:, None]).sum(-1, keepdim=True)  # >= 1
            outside = probs < ordered.gather(1, inside - 1)
        else:
            keys = _ordered(logits)
            kth = _radix_edge(keys, None, top_k.clamp(1, logits.shape[-1]))
            logits = logits.masked_fill((top_k[:, None] > 0) & (keys < kth), float("-inf"))
            probs = logits.softmax(-1)
            keys = probs.view(torch.int32)
            mass = (probs * _UNIT).long()
            outside = keys < _radix_edge(keys, mass, (top_p * _UNIT).long())
        logits = logits.masked_fill((top_p[:, None] < 1) & outside, float("-inf"))
    if floor:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """fp32 values as int32 keys in the same order (-inf the lowest; -0.0 as 0.0, equal as floats):
    a negative float's bits, as an integer, fall as the float rises; flipping all but the sign bit
    reverses that."""
    bits = torch.where(x == 0, 0.0, x).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _radix_edge(keys: torch.Tensor, weights: torch.Tensor | None, need: torch.Tensor) -> torch.Tensor:
    """Per row of int32 keys [R, V], the largest key t [R, 1] whose keys >= t weigh at least need [R]
    (weights [R, V], int64; None: each key weighs 1; where all keys weigh less, the least int32).
    Radix select: four passes, each a histogram of one byte of the keys still in the running."""
    unsigned = keys.long() + 2**31
    weights = torch.ones_like(unsigned) if weights is None else weights
    prefix = torch.zeros_like(unsigned[:, :1])
    above = torch.zeros_like(prefix)  # the weight of the keys above the prefix's range
    need = need[:, None]
    for shift in (24, 16, 8, 0):
        digits = (unsigned >> shift) & 255
        running = (unsigned >> (shift + 8)) == prefix
        histogram = unsigned.new_zeros(unsigned.shape[0], 256).scatter_add(1, digits, weights * running)
        reach = histogram.flip(-1).cumsum(-1).flip(-1) + above  # per digit: the weight of keys >= it
        digit = ((reach >= need).sum(-1, keepdim=True) - 1).clamp(min=0)
        above = reach.gather(1, digit) - histogram.gather(1, digit)
        prefix = (prefix << 8) | digit
    return (prefix - 2**31).int()


def tempered(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
             top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None, ranked: bool = True,
             floor: bool = True) -> torch.Tensor:
    """The distributions rows draw from: softmax of logits / temperature [R], after top-k / top-p /
    min-p (filter_logits) where they are given (all three or none)."""
    scaled = logits / temperature[:, None]
    if top_k is not None:
        scaled = filter_logits(scaled, top_k, top_p, min_p, ranked, floor)
    return scaled.softmax(-1)
