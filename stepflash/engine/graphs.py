"""CUDA graphs for decode and MTP-verify steps: the target forward of a step made only of short
chunks, captured once per bucket of query rows and replayed with the step's inputs copied into the
bucket's static buffers.

A step of n rows from s sequences runs in the smallest bucket N >= n. Rows n..N-1 are padding (each
its own attention tile): token 0 at position 0 of sequence row s, whose block table points at the
runner's scratch blocks, so their keys, values and hidden states land there and nothing they
compute is read back. Table columns past a sequence's own blocks keep stale values and are never
read (a row reads only the blocks up to its position). Logits come out for every row of the bucket; the caller picks its rows.

Where CUDA graphs do not exist (CPU), `capture=False` runs the same bucketed step eagerly on the
static buffers, so tests check the padding and buffer handling without a GPU.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class StaticStep:
    """Inputs of one bucket of N rows (filled in place before every replay) and its logits [N, V]."""

    ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    seq_of: torch.Tensor  # [N] int32: row of `tables` each query reads
    q_pos: torch.Tensor  # [N] int32
    tiles: torch.Tensor  # [N, 2] int32: the step's attention tiles, one per padding row, then empty ones
    slots: dict[str, torch.Tensor]  # kind -> [N] long: where each row's key and value are written
    tables: dict[str, torch.Tensor]  # kind -> [N, width] int32 block tables
    logits: torch.Tensor | None = None


def graph_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to `max_rows` (and `max_rows` itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


class DecodeGraphs:
    """Static buffers and (on CUDA) one captured graph per bucket, built on first use.

    `forward(step)` is the runner's kernel-path target forward over a StaticStep: it must read its
    inputs only from the step's tensors, write KV and hidden caches, and return logits [N, V]."""

    def __init__(self, forward: Callable[[StaticStep], torch.Tensor], kinds: list[str], max_rows: int,
                 table_width: int, scratch: dict[str, int], block_size: int, device: torch.device,
                 capture: bool) -> None:
        self.forward, self.kinds, self.width = forward, kinds, table_width
        self.scratch, self.block_size, self.device, self.capture = scratch, block_size, device, capture
        self.buckets = graph_buckets(max_rows)
        self.steps: dict[int, StaticStep] = {}
        self.graphs: dict[int, "torch.cuda.CUDAGraph"] = {}
        self.pool = None
        self.replays = 0  # steps served from a bucket (graph replays on CUDA)

    def fits(self, rows: int, tables: dict[str, torch.Tensor]) -> bool:
        return rows <= self.buckets[-1] and all(t.shape[1] <= self.width for t in tables.values())

    def run(self, ids: torch.Tensor, positions: torch.Tensor, seq_of: torch.Tensor, q_pos: torch.Tensor,
            tiles: torch.Tensor, slots: dict[str, torch.Tensor], tables: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [n, V] of the n rows given (views into the bucket's output: use before the next run)."""
        n = ids.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        step = self.steps.get(bucket) or self._build(bucket)
        self._fill(step, n, ids, positions, seq_of, q_pos, tiles, slots, tables)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
        else:
            step.logits = self.forward(step)
        self.replays += 1
        return step.logits[:n]

    def _build(self, bucket: int) -> StaticStep:
        """Buffers holding a step of padding only; on CUDA, a warm-up run (kernel compilation, cached
        rotary tables) and the capture, both writing to the scratch blocks alone."""
        long = lambda: torch.zeros(bucket, dtype=torch.long, device=self.device)  # noqa: E731
        int32 = lambda: torch.zeros(bucket, dtype=torch.int32, device=self.device)  # noqa: E731
        step = StaticStep(long(), long(), int32(), int32(), self._padding_tiles(bucket, 0, 0),
                          {kind: torch.full((bucket,), block * self.block_size, dtype=torch.long, device=self.device)
                           for kind, block in self.scratch.items()},
                          {kind: torch.full((bucket, self.width), block, dtype=torch.int32, device=self.device)
                           for kind, block in self.scratch.items()})
        self.steps[bucket] = step
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(step)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                step.logits = self.forward(step)
            self.pool = graph.pool()
            self.graphs[bucket] = graph
        return step

    def _padding_tiles(self, bucket: int, rows: int, tiles: int) -> torch.Tensor:
        """[bucket - tiles, 2]: a one-row tile for each padding row rows..bucket-1, then empty tiles."""
        pad = torch.zeros(bucket - tiles, 2, dtype=torch.int32)
        pad[:bucket - rows, 0] = torch.arange(rows, bucket)
        pad[:bucket - rows, 1] = 1
        return pad.to(self.device)

    def _fill(self, step: StaticStep, n: int, ids: torch.Tensor, positions: torch.Tensor, seq_of: torch.Tensor,
              q_pos: torch.Tensor, tiles: torch.Tensor, slots: dict[str, torch.Tensor],
              tables: dict[str, torch.Tensor]) -> None:
        pad_seq = int(tables[self.kinds[0]].shape[0])  # the first table row no real sequence uses
        for buffer, values, pad in ((step.ids, ids, 0), (step.positions, positions, 0), (step.q_pos, q_pos, 0),
                                    (step.seq_of, seq_of, pad_seq)):
            buffer[:n].copy_(values)
            buffer[n:].fill_(pad)
        step.tiles[:len(tiles)].copy_(tiles)
        step.tiles[len(tiles):].copy_(self._padding_tiles(len(step.ids), n, len(tiles)))
        for kind in self.kinds:
            step.slots[kind][:n].copy_(slots[kind])
            step.slots[kind][n:].fill_(self.scratch[kind] * self.block_size)
            seqs, width = tables[kind].shape
            step.tables[kind][:seqs, :width].copy_(tables[kind])
            if pad_seq < step.tables[kind].shape[0]:
                step.tables[kind][pad_seq, 0] = self.scratch[kind]

