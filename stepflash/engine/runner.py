"""Model runner: owns the KV cache tensors, flattens a scheduled step into one batch, runs the model.

A step's integer inputs (ids, positions, per layer kind the cache slots and block tables, the rows
and tiles of each attention op) are built on the host and sent in one copy; attention reads them
through `PagedAttention` (model/attention.py) with the Triton kernels or their PyTorch twins, the
same inputs either way. Short chunks (decodes, verify steps, MTP drafting rows) go to the paged
op, longer ones (prefill) to the prefill op.

With MTP, the runner also keeps, per position, the hidden state each MTP module chains on: level 0
is the target's last hidden state (before the final norm), level d the output of MTP module d. These
"hidden caches" live in the sliding pool's blocks like the MTP layers' own KV, so prefix hits,
copy-on-write and window release treat them exactly like KV.
"""

import array
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from stepflash.config import ModelConfig
from stepflash.engine.graphs import StepGraphs, StepInputs
from stepflash.engine.kv_cache import FULL, SLIDING, BlockCopy
from stepflash.engine.sequence import Sequence
from stepflash.kernels.tiles import tile_runs
from stepflash.model.attention import ATTENTION_OPS, AttentionRows, PagedAttention
from stepflash.model.step3p5 import Step3p5ForCausalLM, use_kernels


def kv_bytes_per_block(cfg: ModelConfig, layer_ids: list[int], block_size: int, dtype: torch.dtype,
                       hidden_levels: int = 0) -> int:
    """Bytes one block takes in every layer of `layer_ids`, plus `hidden_levels` MTP hidden caches."""
    item = torch.empty((), dtype=dtype).element_size()
    kv = sum(2 * block_size * cfg.layers[i].num_kv_heads * cfg.layers[i].head_dim * item for i in layer_ids)
    return kv + hidden_levels * block_size * cfg.hidden_size * item


PREFILL_TILE = 16  # query rows per program of the prefill kernel
SHORT_CHUNK = 8  # chunks up to this many tokens (decodes, verify steps, MTP drafting) go to the paged op


@dataclass
class Chunk:
    """Tokens `ids` of `seq` at positions start, start + 1, ... computed in one forward."""

    seq: Sequence
    start: int
    ids: list[int]

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


class ModelRunner:
    """Each cache pool has one block more than the KV manager hands out: the scratch block, where
    the padding rows of a graphed step write (engine/graphs.py). With `graph_rows` > 0 (kernels
    only), target steps of short chunks up to that many rows, and MTP drafting passes, run from
    per-bucket CUDA graphs (`capture`), or eagerly on the same static buffers where there is no CUDA."""

    def __init__(self, model: Step3p5ForCausalLM, num_blocks: dict[str, int], block_size: int,
                 kernels: bool = False, graph_rows: int = 0, max_model_len: int = 0, capture: bool = False) -> None:
        self.model, self.block_size, self.kernels = model, block_size, kernels
        use_kernels(model, kernels)  # the backend, chosen once: the modules' kernels and the attention ops
        self.ops = ATTENTION_OPS["triton" if kernels else "torch"]
        cfg = model.config
        self.window = cfg.sliding_window
        param = model.lm_head.weight
        self.device, self.dtype = param.device, param.dtype
        layers = cfg.decoder_layers + cfg.mtp_layers[: len(model.mtp)]
        self.kind_of = {s.index: SLIDING if s.sliding_window else FULL for s in layers}
        self.kinds = sorted(set(self.kind_of.values()))
        self.scratch = {kind: num_blocks[kind] for kind in self.kinds}  # the block past the managed ones
        self.caches = {
            s.index: tuple(torch.zeros(num_blocks[self.kind_of[s.index]] + 1, block_size, s.num_kv_heads, s.head_dim,
                                       dtype=self.dtype, device=self.device) for _ in range(2))
            for s in layers
        }
        self.num_mtp = len(model.mtp)
        hidden_rows = (num_blocks.get(SLIDING, 0) + 1) * block_size
        self.hidden = [torch.zeros(hidden_rows, cfg.hidden_size, dtype=self.dtype, device=self.device)
                       for _ in range(self.num_mtp)]  # level d: what MTP module d chains on, per slot
        # decode kernel tiles: the 1 + k rows of a verify step (a power of two) read their keys once
        self.tile_rows = min(1 << self.num_mtp.bit_length(), SHORT_CHUNK)
        self.graphs, self.mtp_graphs = None, []
        if graph_rows:
            if not kernels:
                raise ValueError("graphed steps need the Triton kernels (the PyTorch MoE reads shapes on the host)")
            # table columns: a full layer's whole context; a sliding layer's window plus a short chunk,
            # plus blocks appended ahead for drafts (wider tables run eagerly)
            widths = {FULL: math.ceil(max_model_len / block_size) + 1,
                      SLIDING: (self.window + SHORT_CHUNK) // block_size + 4}
            pool = torch.cuda.graph_pool_handle() if capture else None
            self.graphs = StepGraphs(self._graph_forward, self.kinds, graph_rows, widths, self.scratch, block_size,
                                     self.device, capture, pool)
            # a drafting pass also catches up the rows accepted at the last verify: up to twice as many
            self.mtp_graphs = [StepGraphs(partial(self._graph_mtp_forward, depth), [SLIDING], 2 * graph_rows, widths,
                                          self.scratch, block_size, self.device, capture, pool)
                               for depth in range(self.num_mtp)]

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk], copies: list[BlockCopy], logit_rows: list[int]) -> torch.Tensor:
        """Run the target over `chunks`; returns fp32 logits for the flat rows `logit_rows` (in that order)."""
        self.copy_blocks(copies)
        ids, positions, ctx = self._prepare(chunks)
        rows = self._tensor(logit_rows)
        if self.graphs and ctx.prefill is None and self.graphs.fits(len(ids), ctx.tables):
            hidden = self.graphs.run(_step_inputs(ids, positions, ctx))
        else:
            hidden = self._forward(ids, positions, ctx)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: PagedAttention) -> torch.Tensor:
        """The target's pre-norm hidden states, stored as MTP hidden level 0 at the rows' slots."""
        hidden = self.model(ids, positions, ctx)
        if self.hidden:
            self.hidden[0].index_copy_(0, ctx.slots[SLIDING], hidden)
        return hidden

    def _graph_forward(self, step: StepInputs) -> torch.Tensor:
        """What a target graph captures: the target over a bucket's static inputs."""
        return self._forward(step.ids, step.positions, self._graph_context(step, self.kinds))

    def _graph_mtp_forward(self, depth: int, step: StepInputs) -> torch.Tensor:
        """What an MTP graph captures: module `depth` over a bucket's static inputs."""
        ctx = self._graph_context(step, [SLIDING])
        return self._mtp_forward(depth, step.ids, step.positions, step.prev_slots, ctx)

    def _graph_context(self, step: StepInputs, kinds: list[str]) -> PagedAttention:
        return PagedAttention(self.ops, self.caches, self.kind_of, {k: step.slots[k] for k in kinds},
                              {k: step.tables[k] for k in kinds}, {k: step.first_blocks[k] for k in kinds},
                              AttentionRows(None, step.seq_of, step.q_pos, step.tiles, self.tile_rows), None)

    @torch.inference_mode()
    def execute_mtp(self, depth: int, chunks: list[Chunk], logit_rows: list[int]) -> torch.Tensor:
        """MTP module `depth` over `chunks`: each position p chains on hidden level `depth` at p - 1
        (zeros before position 0) and the token at p; its output is stored as level depth + 1.
        Returns fp32 logits of its head for the flat rows `logit_rows`."""
        ids, positions, ctx = self._prepare(chunks, [SLIDING])  # MTP layers are sliding layers
        prev_slots = self._tensor([slot for c in chunks for slot in self._previous_slots(c)])
        rows = self._tensor(logit_rows)
        graphs = self.mtp_graphs[depth] if self.mtp_graphs else None
        if graphs and ctx.prefill is None and graphs.fits(len(ids), ctx.tables):
            z = graphs.run(_step_inputs(ids, positions, ctx, prev_slots))
        else:
            z = self._mtp_forward(depth, ids, positions, prev_slots, ctx)
        return self.model.mtp_logits(depth, z.index_select(0, rows))

    def _mtp_forward(self, depth: int, ids: torch.Tensor, positions: torch.Tensor, prev_slots: torch.Tensor,
                     ctx: PagedAttention) -> torch.Tensor:
        """MTP module `depth`'s output, stored as hidden level depth + 1 at the rows' slots."""
        prev = self.hidden[depth].index_select(0, prev_slots)
        prev = prev.masked_fill((positions == 0)[:, None], 0.0)
        z = self.model.mtp_hidden(depth, ids, prev, positions, ctx)
        if depth + 1 < self.num_mtp:
            self.hidden[depth + 1].index_copy_(0, ctx.slots[SLIDING], z)
        return z

    def _previous_slots(self, chunk: Chunk) -> list[int]:
        """Slots of positions start - 1 .. end - 2; position -1 (no predecessor) reads position 0's
        slot, and the caller zeroes that row."""
        bs, table = self.block_size, chunk.seq.blocks.sliding
        if chunk.start > 0:
            return _slots(table, chunk.start - 1, chunk.end - 1, bs)
        return _slots(table, 0, 1, bs) + _slots(table, 0, chunk.end - 1, bs)

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        for c in copies:
            for layer, (k, v) in self.caches.items():
                if self.kind_of[layer] == c.kind:
                    k[c.dst] = k[c.src]
                    v[c.dst] = v[c.src]
            if c.kind == SLIDING:
                bs = self.block_size
                for level in self.hidden:
                    level[c.dst * bs:(c.dst + 1) * bs] = level[c.src * bs:(c.src + 1) * bs]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare(self, chunks: list[Chunk], kinds: list[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, PagedAttention]:
        """Flat ids and positions, and the attention context for layers of `kinds` (default: all): the
        step's integer inputs, gathered on the host and sent to the device in one copy."""
        kinds = kinds or self.kinds
        ids = [t for c in chunks for t in c.ids]
        positions = [p for c in chunks for p in range(c.start, c.end)]
        seq_of = [i for i, c in enumerate(chunks) for _ in c.ids]
        up = Upload()
        sent = {"ids": up.add(ids), "positions": up.add(positions)}
        for kind in kinds:
            # sliding layers: each table from the first block the chunk's window can reach
            first = [max(0, c.start - self.window + 1) // self.block_size if kind == SLIDING else 0 for c in chunks]
            sent["first", kind] = up.add(first, int32=True)
            sent["table", kind] = up.add_rows([c.seq.blocks.table(kind)[f:] for c, f in zip(chunks, first)])
            sent["slots", kind] = up.add([s for c in chunks
                                          for s in _slots(c.seq.blocks.table(kind), c.start, c.end, self.block_size)])
        long_rows = [len(c.ids) > SHORT_CHUNK for c in chunks for _ in c.ids]
        rows = {flag: [i for i, f in enumerate(long_rows) if f == flag] for flag in (False, True)}
        for flag, index in rows.items():
            if index:
                set_seq = [seq_of[i] for i in index]
                sent["index", flag] = up.add(index) if len(index) < len(ids) else None
                sent["seq_of", flag] = up.add(set_seq, int32=True)
                sent["q_pos", flag] = up.add([positions[i] for i in index], int32=True)
                tile_rows = PREFILL_TILE if flag else self.tile_rows
                sent["tiles", flag] = up.add(tile_runs(set_seq, tile_rows), int32=True, width=2)
        got = up.send(self.device)
        sets = {flag: AttentionRows(got(sent["index", flag]), got(sent["seq_of", flag]), got(sent["q_pos", flag]),
                                    got(sent["tiles", flag]), PREFILL_TILE if flag else self.tile_rows)
                for flag, index in rows.items() if index}
        ctx = PagedAttention(self.ops, self.caches, self.kind_of, {k: got(sent["slots", k]) for k in kinds},
                             {k: got(sent["table", k]).clamp_(min=0) for k in kinds},  # NO_BLOCK: never read
                             {k: got(sent["first", k]) for k in kinds}, sets.get(False), sets.get(True))
        return got(sent["ids"]), got(sent["positions"]), ctx


class Upload:
    """Integer arrays of one forward, packed on the host (array.array: several times faster than
    torch.tensor on Python lists) and sent to the device in a single copy from pinned memory, instead
    of one blocking copy per array."""

    def __init__(self) -> None:
        self.data = array.array("q")
        self.parts: list[tuple[int, int, int, bool]] = []  # start, length, row width (0: 1-D), int32

    def add(self, values: list[int], int32: bool = False, width: int = 0) -> int:
        start = len(self.data)
        self.data.extend(values)
        self.parts.append((start, len(self.data) - start, width, int32))
        return len(self.parts) - 1

    def add_rows(self, rows: list[list[int]]) -> int:
        """Rows padded with zeros to the longest, as an int32 [len(rows), longest] array."""
        width = max(len(r) for r in rows)
        start = len(self.data)
        for r in rows:
            self.data.extend(r)
            if len(r) < width:
                self.data.extend(array.array("q", bytes(8 * (width - len(r)))))
        self.parts.append((start, len(self.data) - start, width, True))
        return len(self.parts) - 1

    def send(self, device: torch.device) -> Callable[[int | None], torch.Tensor | None]:
        """One copy to `device`; returns the lookup from `add`'s handles to device tensors."""
        flat = torch.frombuffer(self.data, dtype=torch.int64) if self.data else torch.zeros(0, dtype=torch.int64)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        else:
            flat = flat.clone()  # not a view of the array, which the caller may drop

        def get(handle: int | None) -> torch.Tensor | None:
            if handle is None:
                return None
            start, length, width, int32 = self.parts[handle]
            part = flat[start:start + length]
            part = part.view(-1, width) if width else part
            return part.to(torch.int32) if int32 else part

        return get


def _step_inputs(ids: torch.Tensor, positions: torch.Tensor, ctx: PagedAttention,
                 prev_slots: torch.Tensor | None = None) -> StepInputs:
    d = ctx.decode
    return StepInputs(ids, positions, d.seq_of, d.q_pos, d.tiles, ctx.slots, ctx.tables, ctx.first_blocks, prev_slots)


def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start..end-1: one range per block, not a Python step per token."""
    out: list[int] = []
    for b in range(start // block_size, (end - 1) // block_size + 1):
        base = table[b] * block_size - b * block_size
        out.extend(range(base + max(start, b * block_size), base + min(end, (b + 1) * block_size)))
    return out
