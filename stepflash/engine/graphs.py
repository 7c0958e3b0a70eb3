"""CUDA graphs for decode and MTP-verify steps: the target forward of a step made only of short
chunks, captured once per bucket of query rows and replayed with the step's inputs copied into the
bucket's static buffers.

A step of n rows from s sequences runs in the smallest bucket N >= n. Rows n..N-1 are padding (each
its own attention tile): token 0 at position 0 of sequence row s, whose block table points at the
runner's scratch blocks, so their keys, values and hidden states land there and nothing they
compute is read back. Table columns past a sequence's own blocks keep stale values and are never
read (a row reads only the blocks up to its position). A graph's output is the hidden state of
every row of the bucket; the caller applies the head to the rows it needs (a [N, vocab] output per
bucket would cost gigabytes).

The runner keeps one StepGraphs for the target and one per MTP module (the drafting passes: short
chunks of the sliding layers, each row also reading the hidden state it chains on). Where CUDA
graphs do not exist (CPU), `capture=False` runs the same bucketed step eagerly on the static
buffers, so tests check the padding and buffer handling without a GPU.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    """What a graphed forward reads, for n rows (a step's own values) or N rows (a bucket's static
    buffers, filled in place before every replay)."""

    ids: torch.Tensor  # [n] long
    positions: torch.Tensor  # [n] long
    seq_of: torch.Tensor  # [n] int32: row of `tables` each query reads
    q_pos: torch.Tensor  # [n] int32
    tiles: torch.Tensor  # [t, 2] int32 attention tiles (kernels/tiles.py); in a bucket: [N, 2], then
    #                      one tile per padding row and empty ones
    slots: dict[str, torch.Tensor]  # kind -> [n] long: where each row's key and value are written
    tables: dict[str, torch.Tensor]  # kind -> [s, width] int32 block tables
    first_blocks: dict[str, torch.Tensor]  # kind -> [s] int32: the block each table row starts at
    prev_slots: torch.Tensor | None = None  # [n] long, MTP passes: the hidden-cache slot each row chains on


def graph_buckets(max_rows: int) -> list[int]:
    """Every size up to 8, multiples of 4 up to 32 (verify steps with MTP-3 come in fours), of 8 up to
    64, then of 16; capped by and ending at `max_rows`. Padding rows are not free (each routes to
    its own top-k experts, whose weights are read), so small buckets are dense; graphs are captured
    only when a bucket is first used."""
    sizes = [*range(1, 9), *range(12, 33, 4), *range(40, 65, 8), *range(80, max_rows, 16)]
    return [b for b in sizes if b < max_rows] + [max_rows]


class StepGraphs:
    """Static buffers and (on CUDA) one captured graph per bucket, built on first use.

    `forward(inputs)` is a kernel-path forward of the runner (the target, or one MTP module) over a
    bucket's StepInputs: it reads its inputs only from them, writes KV and hidden caches, and
    returns the hidden states [N, hidden]. Graphs share the memory pool `pool` (replays are
    sequential and each output is used before the next replay)."""

    def __init__(self, forward: Callable[[StepInputs], torch.Tensor], kinds: list[str], max_rows: int,
                 widths: dict[str, int], scratch: dict[str, int], block_size: int, device: torch.device,
                 capture: bool, pool: tuple | None = None) -> None:
        self.forward, self.kinds, self.widths = forward, kinds, widths  # widths: table columns per kind
        self.scratch, self.block_size, self.device, self.capture = scratch, block_size, device, capture
        self.buckets = graph_buckets(max_rows)
        self.static: dict[int, StepInputs] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.one_row_tiles: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, "torch.cuda.CUDAGraph"] = {}
        self.pool = pool
        self.replays = 0  # steps served from a bucket (graph replays on CUDA)
        self.too_big = 0  # steps of short chunks that ran eagerly: more rows or wider tables than the buckets

    def fits(self, rows: int, tables: dict[str, torch.Tensor]) -> bool:
        ok = rows <= self.buckets[-1] and all(t.shape[1] <= self.widths[k] for k, t in tables.items())
        self.too_big += not ok
        return ok

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [n, hidden] of the step's n rows (a view into the bucket's output: use it
        before the next run)."""
        n = inputs.ids.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        static = self.static.get(bucket) or self._build(bucket)
        self._fill(static, inputs)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
        else:
            self.outputs[bucket] = self.forward(static)
        self.replays += 1
        return self.outputs[bucket][:n]

    def _build(self, bucket: int) -> StepInputs:
        """Buffers holding a step of padding only; on CUDA, a warm-up run (kernel compilation, cached
        rotary tables) and the capture, both writing to the scratch blocks alone."""
        static = StepInputs(*(torch.zeros(bucket, dtype=dtype, device=self.device) for dtype in
                              (torch.long, torch.long, torch.int32, torch.int32)),
                            self._one_row_tiles(bucket).clone(),
                            {kind: self._scratch_slots(kind, bucket) for kind in self.kinds},
                            {kind: torch.full((bucket, self.widths[kind]), self.scratch[kind], dtype=torch.int32,
                                              device=self.device) for kind in self.kinds},
                            {kind: torch.zeros(bucket, dtype=torch.int32, device=self.device) for kind in self.kinds},
                            self._scratch_slots(self.kinds[0], bucket))
        self.static[bucket] = static
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bucket] = self.forward(static)
            self.graphs[bucket] = graph
        return static

    def _scratch_slots(self, kind: str, rows: int) -> torch.Tensor:
        return torch.full((rows,), self.scratch[kind] * self.block_size, dtype=torch.long, device=self.device)

    def _one_row_tiles(self, bucket: int) -> torch.Tensor:
        """[bucket, 2]: tile i = row i alone (kept on the device, so filling padding copies nothing
        from the host)."""
        if bucket not in self.one_row_tiles:
            rows = torch.arange(bucket, dtype=torch.int32)
            self.one_row_tiles[bucket] = torch.stack([rows, torch.ones_like(rows)], 1).to(self.device)
        return self.one_row_tiles[bucket]

    def _fill(self, static: StepInputs, inputs: StepInputs) -> None:
        n, bucket = inputs.ids.shape[0], static.ids.shape[0]
        pad_seq = int(inputs.tables[self.kinds[0]].shape[0])  # the first table row no real sequence uses
        for name, pad in (("ids", 0), ("positions", 0), ("q_pos", 0), ("seq_of", pad_seq)):
            getattr(static, name)[:n].copy_(getattr(inputs, name))
            getattr(static, name)[n:].fill_(pad)
        if inputs.prev_slots is not None:
            static.prev_slots[:n].copy_(inputs.prev_slots)
            static.prev_slots[n:].fill_(self.scratch[self.kinds[0]] * self.block_size)
        tiles = inputs.tiles.shape[0]  # then one tile per padding row, then empty tiles
        static.tiles[:tiles].copy_(inputs.tiles)
        static.tiles[tiles:tiles + bucket - n].copy_(self._one_row_tiles(bucket)[n:])
        static.tiles[tiles + bucket - n:].fill_(0)
        for kind in self.kinds:
            static.slots[kind][:n].copy_(inputs.slots[kind])
            static.slots[kind][n:].fill_(self.scratch[kind] * self.block_size)
            seqs, width = inputs.tables[kind].shape
            static.tables[kind][:seqs, :width].copy_(inputs.tables[kind])
            static.first_blocks[kind][:seqs].copy_(inputs.first_blocks[kind])
            static.first_blocks[kind][seqs:].fill_(0)  # the padding sequence's table starts at block 0
            if pad_seq < bucket:
                static.tables[kind][pad_seq, 0] = self.scratch[kind]
