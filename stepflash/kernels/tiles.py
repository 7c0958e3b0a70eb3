"""Host-side work plans for the kernels (plain Python: nothing is read back from the device)."""

import functools
import itertools

import torch


def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count (read once per device: it sizes grids on every call); 0 off CUDA."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 0


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_runs(seq_of: list[int], block_m: int) -> list[int]:
    """Flat (first row, row count) pairs: runs of consecutive rows of one sequence, at most block_m long."""
    return length_tiles([len(list(run)) for _, run in itertools.groupby(seq_of)], block_m)


def length_tiles(lengths: list[int], block_m: int) -> list[int]:
    """`tile_runs` of rows that come in runs of `lengths` (one sequence each): a step per tile, not per row."""
    tiles, start = [], 0
    for n in lengths:
        for first in range(0, n, block_m):
            tiles += (start + first, min(block_m, n - first))
        start += n
    return tiles


def prefill_tiles(seq_of: list[int], block_m: int) -> torch.Tensor:
    """`tile_runs` as a [tiles, 2] int32 tensor."""
    return torch.tensor(tile_runs(seq_of, block_m), dtype=torch.int32).view(-1, 2)
