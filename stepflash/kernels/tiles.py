"""Host-side work plans for the kernels (plain Python: nothing is read back from the device)."""

import torch


def prefill_tiles(seq_of: list[int], block_m: int) -> torch.Tensor:
    """[tiles, 2] int32 (first row, row count): runs of consecutive rows of one sequence, at most
    block_m long."""
    tiles, start = [], 0
    for i in range(1, len(seq_of) + 1):
        if i == len(seq_of) or seq_of[i] != seq_of[start] or i - start == block_m:
            tiles.append((start, i - start))
            start = i
    return torch.tensor(tiles, dtype=torch.int32)
