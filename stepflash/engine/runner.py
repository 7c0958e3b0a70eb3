"""Model runner: owns the KV cache tensors and the device block tables, turns a step's plan into
one flat batch (`StepRows`: the target's chunks, the drafts' places, the rows whose logits the
sampler reads), runs the model.

A step's integer inputs (ids, positions, per layer kind the cache slots and block tables, the rows
and tiles of each attention op) are built on the host and sent in one copy; attention reads them
through `PagedAttention` (model/attention.py) with the Triton kernels or their PyTorch twins, the
same inputs either way. Short chunks (decodes, verify steps, MTP drafting rows) go to the paged
op, longer ones (prefill) to the prefill op.

Images (Step 3.7): a forward whose chunks reach an image's placeholders gets that image's features
from the vision tower, computed once per image (the step's new images in one batch of global views
and one of crops) and kept per sequence until the target and the MTP modules have both passed the
image (a preempted sequence recomputes them); the features replace those rows' embeddings, in the
target and in every MTP module.

Under tensor parallelism every rank holds a runner over its shard of the model and its heads of
the KV cache: rank 0's runner packs each call (`StepCall`: the host arrays above and what unpacks
them) and hands it to the other ranks before running it (`channel`); they run the same call.

With MTP, the runner also keeps, per position, the hidden state each MTP module chains on: level 0
is the target's last hidden state (before the final norm), level d the output of MTP module d. These
"hidden caches" live in the sliding pool's blocks like the MTP layers' own KV, so prefix hits,
copy-on-write and window release treat them exactly like KV.
"""

import array
import bisect
import ctypes
import itertools
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch

from stepflash.engine.draws import DRAFT, draw, tempered
from stepflash.engine.graphs import StepGraphs, StepInputs
from stepflash.config import LayerKind
from stepflash.engine.kv_cache import FULL, SLIDING, BlockCopy, KVLayout
from stepflash.engine.scheduler import ScheduledSeq, StepPlan
from stepflash.engine.sequence import Sequence
from stepflash.kernels.tiles import length_tiles
from stepflash.model.attention import ATTENTION_OPS, AttentionRows, PagedAttention
from stepflash.model.step3p5 import Embeds, Step3p5ForCausalLM, use_kernels
from stepflash.multimodal import PlacedImage

if TYPE_CHECKING:
    from stepflash.distributed import PlanChannel
    from stepflash.engine.speculative import Drafts
    from stepflash.sampling import SamplingParams


PREFILL_TILE = 16  # query rows per program of the prefill kernel
SHORT_CHUNK = 8  # chunks up to this many tokens (decodes, verify steps, MTP drafting) go to the paged op


class Logits(NamedTuple):
    """A forward's fp32 logits [R, V] for the rows asked, and their argmax [R] where the step computes
    it beside them (compiled steps, in the graph: on the CPU an eager argmax costs 15-50 us a call)."""

    values: torch.Tensor
    argmax: torch.Tensor | None = None


@dataclass
class Chunk:
    """Tokens `ids` of `seq` at positions start, start + 1, ... computed in one forward."""

    seq: Sequence
    start: int
    ids: list[int]

    @property
    def end(self) -> int:
        return self.start + len(self.ids)

    @property
    def reaches_images(self) -> bool:
        """Whether the chunk starts before its sequence's last image ends (it may hold image rows)."""
        return bool(self.seq.images) and self.start < self.seq.images[-1].end


@dataclass
class Inject:
    """Token ids that exist only on the device (MTP drafts): flat rows of a forward and the
    positions of their ids in `source` (viewed flat), written into the ids before the forward."""

    rows: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    source: torch.Tensor | None = None

    def add(self, rows: range, first: int, source: torch.Tensor) -> None:
        self.rows += rows
        self.index += range(first, first + len(rows))
        self.source = source


WIRE_DTYPES = {"int64": torch.int64, "int32": torch.int32}  # the dtypes of a forward's packed inputs


@dataclass
class StepCall:
    """One runner call as every rank runs it: `op` "target", "mtp" (module `depth`; without arrays,
    the step's drafting call again: `execute_mtp`) or "copy"; the forward's host arrays packed for
    one copy (`upload`) and their handles; per layer kind the step table width; how many table rows
    the device tables need; the shape of the device-only ids (MTP drafts) to inject and the number
    of image rows, whose values (drafts; image features, which rank 0 alone computes) rank 0 sends
    beside the call; the block copies."""

    op: str
    depth: int = 0
    kinds: list[LayerKind] = field(default_factory=list)
    upload: "Upload | None" = None
    handles: dict[str, int | None] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    table_rows: int = 0
    source_shape: list[int] | None = None
    image_rows: int = 0
    copies: list[tuple[str, int, int]] = field(default_factory=list)

    def wire(self) -> tuple[dict, bytes]:
        """JSON metadata and the packed arrays' bytes (distributed.PlanChannel)."""
        meta = {k: v for k, v in vars(self).items() if k != "upload"}
        if self.upload is None:
            return meta, b""
        meta["parts"] = [(start, count, width, str(dtype).removeprefix("torch."))
                         for start, count, width, dtype in self.upload.parts]
        return meta, self.upload.data.tobytes()

    @classmethod
    def from_wire(cls, meta: dict, data: bytes) -> "StepCall":
        parts = meta.pop("parts", None)
        call = cls(**meta)
        call.kinds = [LayerKind(k) for k in call.kinds]
        if parts is not None:
            call.upload = Upload()
            call.upload.data.frombytes(data)
            call.upload.parts = [(start, count, width, WIRE_DTYPES[dtype]) for start, count, width, dtype in parts]
        return call


@dataclass
class Inputs:
    """A forward's tensors: ids and positions, the attention context, the rows whose output is
    wanted and, for an MTP pass, the hidden-cache slots each row chains on."""

    ids: torch.Tensor
    positions: torch.Tensor
    ctx: PagedAttention
    logit_rows: torch.Tensor
    prev_slots: torch.Tensor | None = None
    embeds: Embeds | None = None  # image features replacing some rows' embeddings


@dataclass
class StepRows:
    """The target's inputs for a plan and where the sampler finds its logits: `logit_rows` lists
    width = K + 1 rows per sampling member (its newest token and drafts, padded by repeating the
    last), then one row per scored prompt position."""

    chunks: list[Chunk]
    inject: Inject
    logit_rows: list[int]
    members: list[tuple[ScheduledSeq, Sequence]]  # who samples (n > 1 forks share their parent's rows)
    width: int
    prompt: list[tuple[Sequence, int]]  # (sequence, position p): scores the prompt token at p + 1

    @classmethod
    def of(cls, plan: StepPlan, drafts: "Drafts | None") -> "StepRows":
        width = 1 + max((s.num_drafts for s in plan.seqs), default=0)
        rows = cls([], Inject(), [], [], width, [])
        prompt_rows, row = [], 0
        for s in plan.seqs:
            if not s.num_new:
                continue  # draining: MTP catch-up only
            seq = s.seq
            rows.chunks.append(Chunk(seq, s.start, seq.token_ids[s.start:s.end] + [0] * s.num_drafts))
            if s.num_drafts:
                rows.inject.add(range(row + s.num_new, row + s.num_new + s.num_drafts),
                                drafts.row(s) * (width - 1), drafts.tokens)
            if s.samples:
                last = row + s.num_new - 1
                own = [last + min(j, s.num_drafts) for j in range(width)]
                for member in [seq, *s.forks]:
                    rows.logit_rows += own
                    rows.members.append((s, member))
            if seq.params.prompt_logprobs is not None:
                for p in range(max(s.start, seq.num_prompt_scored), min(s.end, seq.num_prompt_tokens - 1)):
                    rows.prompt.append((seq, p))
                    prompt_rows.append(row + p - s.start)
            row += s.num_new + s.num_drafts
        rows.logit_rows += prompt_rows
        return rows


@dataclass
class DraftRows:
    """A step's MTP drafting rows, one set that every module runs over: per sequence the rows its
    caches catch up, then, for a sequence that drafts n tokens, its newest token and n - 1 rows for
    drafts 1 .. n - 1 (module d needs those up to draft d; the rows past them are scratch, like the
    speculative rows themselves). Per module: the rows it drafts from (`logit_rows`, in drafting
    order) and the draft rows written into the ids before it runs (`injects`: module d's, the
    drafts of module d - 1)."""

    chunks: list[Chunk]
    logit_rows: list[list[int]]
    injects: list[Inject]


@dataclass
class DraftDraws:
    """How the sampled drafts of one drafting call are drawn (`ModelRunner.plain_drafts`): per drafting
    sequence, in drafting order, whether it is greedy, its temperature (1 where greedy), its seed and
    its length; draft d + 1 is drawn for position length + d, as the sampler draws it (draft_tokens).
    Top-k / top-p / min-p do not apply to drafts drawn here: the verify is lossless for any draft
    distribution it is given, and a graph with them in every module took far longer to compile."""

    greedy: torch.Tensor
    temperature: torch.Tensor
    seeds: torch.Tensor
    positions: torch.Tensor


class DecodeKey(NamedTuple):
    """What a decode chunk's inputs hang on: its sequence and position, and its blocks (per pool the
    count and the block it writes into)."""

    seq: Sequence
    position: int
    blocks: tuple[int, ...]

    @classmethod
    def of(cls, c: Chunk, block_size: int) -> "DecodeKey":
        b, i = c.seq.blocks, c.start // block_size
        return cls(c.seq, c.start, (len(b.full), len(b.sliding), *b.full[i:i + 1], *b.sliding[i:i + 1]))


@dataclass
class Unpacked:
    """A call's inputs on the device: the tensors every part shares and, per part (the target: one;
    a drafting call: one per MTP module), its logit rows and the drafts it injects."""

    call: StepCall
    got: Callable[[int | None], torch.Tensor | None]
    shared: Inputs

    def part(self, i: int, source: torch.Tensor | None) -> Inputs:
        """Part i's inputs: its drafts written into the shared ids (in place: a later part keeps them)."""
        sent, got = self.call.handles, self.got
        rows = sent.get(f"inject_rows {i}")
        if rows is not None:
            self.shared.ids.index_copy_(0, got(rows), source.view(-1)[got(sent[f"inject_index {i}"])])
        return replace(self.shared, logit_rows=got(sent[f"logit_rows {i}"]))


@dataclass
class DecodeStep:
    """The last target step of one token per chunk, packed and on the device, kept because most decode
    steps continue it: the same sequences, each one position on in the same blocks (all but about two
    steps in block_size: a block crossed, the window's first block moved; or a sequence joins, leaves
    or copies a block). Such a step writes its ids, positions and cache slots over the packed arrays
    and sends them again (on the CPU the inputs are views of the arrays: nothing to send): no
    packing, no new tensors."""

    keys: list[DecodeKey]
    logit_rows: list[int]
    call: StepCall
    inputs: Inputs

    def continued_by(self, keys: list[DecodeKey], logit_rows: list[int], block_size: int, window: int) -> bool:
        """Whether a step of chunks with these keys reads the same tables, rows and tiles (positions
        and slots one on): the same sequences, each at the next position in the block it wrote last
        (so no block crossed, added or copied on write), no block left the window."""
        if logit_rows != self.logit_rows or len(keys) != len(self.keys):
            return False
        for (seq, p, blocks), (last, q, last_blocks) in zip(keys, self.keys):
            if seq is not last or p != q + 1 or blocks != last_blocks \
                    or max(0, p - window + 1) // block_size != max(0, q - window + 1) // block_size:
                return False
        return True

    def move_on(self, keys: list[DecodeKey], ids: list[int], block_size: int) -> None:
        """The inputs of the continuing step (`continued_by`), in place; the twin's key plans made again."""
        up, sent = self.call.upload, self.call.handles
        positions = [k.position for k in keys]
        up.write(sent["ids"], ids)
        up.write(sent["positions"], positions)
        up.write(sent["q_pos False"], positions)
        for kind in self.call.kinds:
            up.write(sent[f"slots {kind.value}"],
                     [_slots(k.seq.blocks.table(kind), k.position, k.position + 1, block_size)[0] for k in keys])
        up.resend()
        self.inputs.ctx = self.inputs.ctx.moved_on()
        self.keys = keys


class ModelRunner:
    """Each cache pool has one block more than the KV manager hands out: the scratch block, where
    the padding rows of a graphed step write (engine/graphs.py). With `graph_rows` > 0 (kernels
    only), target steps of short chunks up to that many rows, and MTP drafting passes, run from
    per-bucket CUDA graphs (`capture`), or eagerly on the same static buffers where there is no CUDA."""

    def __init__(self, model: Step3p5ForCausalLM, layout: KVLayout, kernels: bool = False, graph_rows: int = 0,
                 capture: bool = False, channel: "PlanChannel | None" = None, compiled: bool = False) -> None:
        self.model, self.block_size, self.kernels = model, layout.block_size, kernels
        self.channel = channel  # rank 0 under tensor parallelism: where each call goes to the other ranks
        use_kernels(model, kernels)  # the backend, chosen once: the modules' kernels and the attention ops
        self.ops = ATTENTION_OPS["triton" if kernels else "torch"]
        cfg = model.config
        self.window = cfg.sliding_window
        param = model.lm_head.weight
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":
            keep_freed_memory()
        layers = cfg.decoder_layers + cfg.mtp_layers[: len(model.mtp)]
        self.kind_of = {s.index: s.attention_type for s in layers}
        self.kinds = [kind for kind in layout.kinds if kind in self.kind_of.values()]
        num_blocks, block_size = layout.num_blocks, layout.block_size
        self.scratch = {kind: num_blocks[kind] for kind in self.kinds}  # the block past the managed ones
        kv_heads = model.parallel.kv_part  # this rank's heads
        self.caches = {
            s.index: tuple(torch.zeros(num_blocks[self.kind_of[s.index]] + 1, block_size, kv_heads(s.num_kv_heads),
                                       s.head_dim, dtype=self.dtype, device=self.device) for _ in range(2))
            for s in layers
        }
        # the full-attention block table, one row per sequence holding blocks (BlockTables.row), updated with
        # new entries only (two columns at least: see _pack's padding); sliding tables, a window long, are sent
        # whole with each call
        self.full_table = torch.zeros(layout.max_num_seqs + 1, max(layout.table_width(FULL), 2), dtype=torch.int32,
                                      device=self.device)
        self.num_mtp = len(model.mtp)
        hidden_rows = (num_blocks.get(SLIDING, 0) + 1) * block_size
        self.hidden = [torch.zeros(hidden_rows, cfg.hidden_size, dtype=self.dtype, device=self.device)
                       for _ in range(self.num_mtp)]  # level d: what MTP module d chains on, per slot
        # decode kernel tiles: the 1 + k rows of a verify step (a power of two) read their keys once
        self.tile_rows = min(1 << self.num_mtp.bit_length(), SHORT_CHUNK)
        self.graphs, self.mtp_graphs = None, []
        self.last_decode: DecodeStep | None = None
        self.drafting: Unpacked | None = None  # the step's drafting call, which every MTP module runs
        # per sequence: image index -> its features [rows, hidden] (gone with the sequence)
        self.image_features: weakref.WeakKeyDictionary[Sequence, dict[int, torch.Tensor]] = \
            weakref.WeakKeyDictionary()
        if graph_rows:
            if not kernels:
                raise ValueError("graphed steps need the Triton kernels (the PyTorch MoE reads shapes on the host)")
            widths = {kind: layout.table_width(kind, SHORT_CHUNK) for kind in self.kinds}  # wider tables: eager
            pool = torch.cuda.graph_pool_handle() if capture else None
            self.graphs = StepGraphs(self._step_forward, self.kinds, graph_rows, widths, self.scratch, block_size,
                                     self.device, capture, pool)
            # a drafting pass also catches up the rows accepted at the last verify: up to twice as many
            self.mtp_graphs = [StepGraphs(partial(self._step_mtp_forward, depth=depth), [SLIDING], 2 * graph_rows, widths,
                                          self.scratch, block_size, self.device, capture, pool)
                               for depth in range(self.num_mtp)]
        # short-chunk steps through torch.compile instead (the CPU): one compiled function per forward (the
        # target, each MTP module), and one for plain drafting, which runs every MTP module
        self.compiled = (CompiledStep(self._step_logits), *(CompiledStep(self._step_mtp_logits, depth)
                                                            for depth in range(self.num_mtp)),
                         *([CompiledStep(self._step_plain_drafts)] if self.num_mtp else [])) if compiled else ()
        for cache in [t for kv in self.caches.values() for t in kv] + self.hidden if compiled else []:
            torch._dynamo.mark_static(cache)  # their shapes never change: no sizes to read per call

    def execute(self, chunks: list[Chunk], logit_rows: list[int], inject: Inject | None = None) -> Logits:
        """Run the target over `chunks`; returns fp32 logits for the flat rows `logit_rows` (in that order)."""
        embeds = self._image_embeds(chunks)
        if self.channel is None and embeds is None and not (inject and inject.rows) and \
                all(len(c.ids) == 1 for c in chunks):
            return self._decode(chunks, logit_rows)
        self.last_decode = None
        call = self._pack("target", 0, chunks, self.kinds, [logit_rows], [inject])
        return self._run_shared(call, inject, embeds)

    @torch.inference_mode()
    def _decode(self, chunks: list[Chunk], logit_rows: list[int]) -> Logits:
        """A target step of one token per chunk, in this process: the last such step's inputs moved on
        in place where this step continues it (DecodeStep), packed afresh otherwise."""
        last = self.last_decode
        keys = [DecodeKey.of(c, self.block_size) for c in chunks]
        if last is not None and last.continued_by(keys, logit_rows, self.block_size, self.window):
            last.move_on(keys, [c.ids[0] for c in chunks], self.block_size)
        else:
            call = self._pack("target", 0, chunks, self.kinds, [logit_rows], [None])
            last = self.last_decode = DecodeStep(keys, logit_rows, call, self._unpack(call).part(0, None))
        return self._logits(None, last.inputs)

    def execute_mtp(self, depth: int, rows: DraftRows) -> Logits:
        """MTP module `depth` over the step's drafting rows: each position p chains on hidden level
        `depth` at p - 1 (zeros before position 0) and the token at p; its output is stored as level
        depth + 1. Returns fp32 logits of its head for the module's logit rows. Module 0's call packs
        the inputs of every module (one packing, one copy); the later modules' calls continue it."""
        inject = rows.injects[depth]
        if depth == 0:
            call = self._pack("mtp", 0, rows.chunks, [SLIDING], rows.logit_rows, rows.injects)  # sliding layers
            return self._run_shared(call, inject, self._image_embeds(rows.chunks))
        call = StepCall("mtp", depth, source_shape=list(inject.source.shape) if inject.rows else None)
        return self._run_shared(call, inject)

    @torch.inference_mode()
    def plain_drafts(self, rows: DraftRows, sampled: list[Sequence] | None
                     ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
        """Every MTP module over the step's drafting rows in one compiled call, each drafting at its
        logit rows the argmax, or for the sampled of the drafting sequences `sampled` (all of them, in
        drafting order; None: all greedy) a draw at the temperature, before any top-k / top-p / min-p
        (`_step_plain_drafts`, DraftDraws): module d's
        drafts, in its logit rows' order, and where any samples the distributions they were drawn
        from. None where such a step is not compiled (not compiling; a long catch-up, which goes to
        the prefill op; a chunk that may hold image rows): then a call per module (`execute_mtp`)."""
        if not self.compiled or any(len(c.ids) > SHORT_CHUNK or c.reaches_images for c in rows.chunks):
            return None
        call = self._pack("mtp", 0, rows.chunks, [SLIDING], rows.logit_rows, [None] * self.num_mtp)
        up, sent, draws = call.upload, call.handles, None
        if sampled is not None:
            parts = draw_settings(up, [s.params for s in sampled], [s.seed for s in sampled],
                                  [s.num_tokens for s in sampled], filters=False)
        unpacked = self._unpack(call)
        if sampled is not None:
            draws = DraftDraws(*map(unpacked.got, parts))
        logit_rows = tuple(unpacked.got(sent[f"logit_rows {depth}"]) for depth in range(self.num_mtp))
        return self.compiled[-1](_step_inputs(unpacked.shared), logit_rows, draws)

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        if copies:
            self._run_shared(StepCall("copy", copies=[(c.kind, c.src, c.dst) for c in copies]), None)

    def _run_shared(self, call: StepCall, inject: Inject | None, embeds: Embeds | None = None) -> Logits | None:
        """Hand the call to the other ranks (tensor parallelism), with the device tensors they
        cannot compute (drafts to inject, image features), then run it here."""
        source = inject.source if inject and inject.rows else None
        if self.channel is not None:
            if embeds is not None:
                call.image_rows = len(embeds[0])
            self.channel.send(*call.wire())
            for t in [source] + list(embeds or []):
                if t is not None:
                    self.channel.share_tensor(t)
        return self.run(call, source, embeds)

    @torch.inference_mode()
    def run(self, call: StepCall, source: torch.Tensor | None = None,
            embeds: Embeds | None = None) -> Logits | None:
        """Run a packed call on this rank (`source`: the device ids it injects); the logits it asks for.
        An MTP call without arrays continues the step's drafting call (`execute_mtp`)."""
        if call.op == "copy":
            self._copy_blocks([BlockCopy(LayerKind(kind), src, dst) for kind, src, dst in call.copies])
            return None
        if call.op == "target":
            return self._logits(None, self._unpack(call, embeds).part(0, source))
        if call.upload is not None:
            self.drafting = self._unpack(call, embeds)
        return self._logits(call.depth, self.drafting.part(call.depth, source))

    def _logits(self, depth: int | None, x: Inputs) -> Logits:
        """The forward and head of the target (`depth` None) or of MTP module `depth`: compiled, from
        its CUDA graph bucket, or eagerly."""
        short = x.ctx.prefill is None and x.embeds is None  # decodes, verify steps, drafting: graphed or compiled
        mtp, d = depth is not None, depth or 0
        if short and self.compiled:  # the head too
            return self.compiled[d + 1 if mtp else 0](_step_inputs(x), x.logit_rows)
        graphs = (self.mtp_graphs[d] if mtp else self.graphs) if self.graphs else None
        if short and graphs and graphs.fits(len(x.ids), x.ctx.tables):
            hidden = graphs.run(_step_inputs(x))
        elif mtp:
            hidden = self._mtp_forward(d, x.ids, x.positions, x.prev_slots, x.ctx, x.embeds)
        else:
            hidden = self._forward(x.ids, x.positions, x.ctx, x.embeds)
        rows = hidden.index_select(0, x.logit_rows)
        return Logits(self.model.mtp_logits(d, rows) if mtp else self.model.compute_logits(rows))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: PagedAttention,
                 embeds: Embeds | None = None) -> torch.Tensor:
        """The target's pre-norm hidden states, stored as MTP hidden level 0 at the rows' slots."""
        hidden = self.model(ids, positions, ctx, embeds)
        if self.hidden:
            self.hidden[0].index_copy_(0, ctx.slots[SLIDING], hidden)
        return hidden

    def _step_forward(self, step: StepInputs) -> torch.Tensor:
        """What a target graph captures (over a bucket's static inputs), and `_step_logits` compiles:
        the target over a step of short chunks."""
        return self._forward(step.ids, step.positions, self._step_context(step, self.kinds))

    def _step_mtp_forward(self, step: StepInputs, depth: int = 0) -> torch.Tensor:
        """Module `depth` over a drafting step, as graphed."""
        ctx = self._step_context(step, [SLIDING])
        return self._mtp_forward(depth, step.ids, step.positions, step.prev_slots, ctx)

    def _step_logits(self, step: StepInputs, logit_rows: torch.Tensor) -> Logits:
        """What torch.compile compiles: the target over a step of short chunks, its head and argmax."""
        logits = self.model.compute_logits(self._step_forward(step).index_select(0, logit_rows))
        return Logits(logits, logits.argmax(-1))

    def _step_mtp_logits(self, step: StepInputs, logit_rows: torch.Tensor, depth: int = 0) -> Logits:
        """Module `depth` over a drafting step, its head and argmax, compiled."""
        logits = self.model.mtp_logits(depth, self._step_mtp_forward(step, depth).index_select(0, logit_rows))
        return Logits(logits, logits.argmax(-1))

    def _step_plain_drafts(self, step: StepInputs, logit_rows: tuple[torch.Tensor, ...], draws: DraftDraws | None
                           ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """What torch.compile compiles for plain drafting (a graph for greedy steps, `draws` None, and one
        for steps that sample): module d over a drafting step and its draft at each of its logit rows,
        the argmax of its head or a draw from it at the temperature (as draft_tokens draws it where
        no top-k / top-p / min-p applies; DraftDraws); the
        drafts become the ids of module d + 1's logit rows (a sequence's next row: module d drafts
        token d + 1 from row start + d, and module d + 1 reads it there)."""
        ids, drafted, dists = step.ids, [], []
        for depth, rows in enumerate(logit_rows):
            n = rows.shape[0]
            if depth:  # those drafting at this depth are the first of those at the last (MTPDrafter.propose)
                torch._check(n <= drafted[-1].shape[0])
                ids = ids.index_copy(0, rows, drafted[-1][:n])
            hidden = self._step_mtp_forward(replace(step, ids=ids), depth)
            logits = self.model.mtp_logits(depth, hidden.index_select(0, rows))
            top = logits.argmax(-1)
            if draws is None:
                drafted.append(top)
                continue
            torch._check(n <= draws.seeds.shape[0])
            q = tempered(logits, draws.temperature[:n])
            drawn = draw(q, draws.seeds[:n], draws.positions[:n] + depth, DRAFT)
            drafted.append(torch.where(draws.greedy[:n], top, drawn))
            dists.append(q)
        return tuple(drafted), tuple(dists)

    def _step_context(self, step: StepInputs, kinds: list[str]) -> PagedAttention:
        return PagedAttention(self.ops, self.caches, self.kind_of, {k: step.slots[k] for k in kinds},
                              {k: step.tables[k] for k in kinds}, {k: step.first_blocks[k] for k in kinds},
                              AttentionRows(None, step.seq_of, step.q_pos, step.tiles, self.tile_rows), None)

    def _mtp_forward(self, depth: int, ids: torch.Tensor, positions: torch.Tensor, prev_slots: torch.Tensor,
                     ctx: PagedAttention, embeds: Embeds | None = None) -> torch.Tensor:
        """MTP module `depth`'s output, stored as hidden level depth + 1 at the rows' slots."""
        prev = self.hidden[depth].index_select(0, prev_slots)
        prev = prev.masked_fill((positions == 0)[:, None], 0.0)
        z = self.model.mtp_hidden(depth, ids, prev, positions, ctx, embeds)
        if depth + 1 < self.num_mtp:
            self.hidden[depth + 1].index_copy_(0, ctx.slots[SLIDING], z)
        return z

    def _previous_slots(self, chunks: list[Chunk], slots: list[range | list[int]]) -> list[int]:
        """Slots of positions start - 1 .. end - 2 of each chunk: the slot of start - 1, then the
        chunk's own sliding `slots` but the last. Position -1 (no predecessor) reads position 0's
        slot, and the caller zeroes that row."""
        bs, out = self.block_size, []
        for c, own in zip(chunks, slots):
            p = max(c.start - 1, 0)
            out.append(c.seq.blocks.sliding[p // bs] * bs + p % bs)
            out += own[:-1]
        return out

    def _copy_blocks(self, copies: list[BlockCopy]) -> None:
        for c in copies:
            for layer, (k, v) in self.caches.items():
                if self.kind_of[layer] == c.kind:
                    k[c.dst] = k[c.src]
                    v[c.dst] = v[c.src]
            if c.kind == SLIDING:
                bs = self.block_size
                for level in self.hidden:
                    level[c.dst * bs:(c.dst + 1) * bs] = level[c.src * bs:(c.src + 1) * bs]

    def _pack(self, op: str, depth: int, chunks: list[Chunk], kinds: list[LayerKind], logit_rows: list[list[int]],
              injects: list[Inject | None]) -> StepCall:
        """The forward's integer inputs, gathered on the host for one copy to the device: ids and
        positions, per layer kind the cache slots and each row's table start, the new entries of the
        full-attention table and the whole sliding tables (from the first block each chunk's window
        reaches: a few entries, however long the context), and the rows and tiles of each attention op;
        per part of the call (`Unpacked`), its logit rows and the drafts it injects.

        Compiled steps get at least two table columns: torch.compile compiles a variant of its own
        for each dimension of size 1, so a new kind of step would otherwise stall the engine while
        it compiles; the extra column is read by no row (keys past a row's position are masked).
        Sequences, tiles and logit rows are not padded (an extra tile would attend over its
        sequence's keys again, an extra logit row cost a row of the vocabulary head): their counts
        are unbacked (CompiledStep)."""
        ids = [t for c in chunks for t in c.ids]
        positions = [p for c in chunks for p in range(c.start, c.end)]
        seq_of = [i for i, c in enumerate(chunks) for _ in c.ids]
        rows = [c.seq.blocks.row for c in chunks]
        up = Upload()
        sent = {"ids": up.add(ids), "positions": up.add(positions), "rows": up.add(rows)}
        call = StepCall(op, depth, kinds, up, sent, table_rows=max(rows, default=0) + 1)
        for i, (own, inject) in enumerate(zip(logit_rows, injects)):
            sent[f"logit_rows {i}"] = up.add(own)
            if inject and inject.rows:
                sent[f"inject_rows {i}"], sent[f"inject_index {i}"] = up.add(inject.rows), up.add(inject.index)
        if injects[0] and injects[0].rows:
            call.source_shape = list(injects[0].source.shape)
        for kind in kinds:
            name = kind.value  # in the keys: formatting the enum itself costs ~1 us a key
            first = [max(0, c.start - self.window + 1) // self.block_size if kind == SLIDING else 0 for c in chunks]
            width = max(len(c.seq.blocks.table(kind)) - f for c, f in zip(chunks, first))
            call.widths[kind] = width = max(width, 2) if self.compiled else width
            sent[f"first {name}"] = up.add(first, dtype=torch.int32)
            if kind == SLIDING:
                table = _window_tables(chunks, first, width)
                sent["sliding table"] = up.add(table, torch.int32, width)
            else:
                new = self._new_entries(chunks)
                sent["new full"] = up.add(new, width=3) if new else None
            slots = [_slots(c.seq.blocks.table(kind), c.start, c.end, self.block_size) for c in chunks]
            sent[f"slots {name}"] = up.add([s for own in slots for s in own])
            if op == "mtp" and kind == SLIDING:  # hidden caches live in the sliding pool's slots
                sent["prev"] = up.add(self._previous_slots(chunks, slots))
        for flag in (False, True):  # the short chunks' rows (the paged op's), then the long ones' (prefill)
            members = [i for i, c in enumerate(chunks) if (len(c.ids) > SHORT_CHUNK) == flag]
            if not members:
                continue
            if len(members) == len(chunks):  # every row (a decode or verify step): no index to send
                sent[f"index {flag}"], set_seq, set_pos = None, seq_of, positions
            else:
                starts = list(itertools.accumulate((len(c.ids) for c in chunks), initial=0))
                index = [r for i in members for r in range(starts[i], starts[i + 1])]
                sent[f"index {flag}"] = up.add(index)
                set_seq, set_pos = [seq_of[r] for r in index], [positions[r] for r in index]
            sent[f"seq_of {flag}"] = up.add(set_seq, dtype=torch.int32)
            sent[f"q_pos {flag}"] = up.add(set_pos, dtype=torch.int32)
            tiles = length_tiles([len(chunks[i].ids) for i in members], PREFILL_TILE if flag else self.tile_rows)
            sent[f"tiles {flag}"] = up.add(tiles, dtype=torch.int32, width=2)
        return call

    def _unpack(self, call: StepCall, embeds: Embeds | None = None) -> Unpacked:
        """The call's inputs on the device, in one copy; the device's full-attention table updated."""
        got, sent = call.upload.send(self.device), call.handles
        tables = {}
        if FULL in call.kinds:
            self._grow_full_table(call.table_rows)
            new = got(sent["new full"])
            if new is not None:
                self.full_table[new[:, 0], new[:, 1]] = new[:, 2].to(torch.int32)
            tables[FULL] = self.full_table.index_select(0, got(sent["rows"]))[:, :call.widths[FULL]]
        if SLIDING in call.kinds:
            tables[SLIDING] = got(sent["sliding table"])
        sets = {flag: AttentionRows(got(sent[f"index {flag}"]), got(sent[f"seq_of {flag}"]),
                                    got(sent[f"q_pos {flag}"]), got(sent[f"tiles {flag}"]),
                                    PREFILL_TILE if flag else self.tile_rows)
                for flag in (False, True) if f"seq_of {flag}" in sent}
        ctx = PagedAttention(self.ops, self.caches, self.kind_of, {k: got(sent[f"slots {k.value}"]) for k in call.kinds},
                             tables, {k: got(sent[f"first {k.value}"]) for k in call.kinds}, sets.get(False),
                             sets.get(True))
        shared = Inputs(got(sent["ids"]), got(sent["positions"]), ctx, got(sent["logit_rows 0"]), got(sent.get("prev")),
                        embeds)
        return Unpacked(call, got, shared)

    # -- images -----------------------------------------------------------------------------------
    def _image_embeds(self, chunks: list[Chunk]) -> Embeds | None:
        """The flat rows of `chunks` that are image placeholders, and their features."""
        if self.model.vision is None:
            return None
        rows, parts, todo, row = [], [], [], 0
        for c in chunks:
            if c.reaches_images:
                cached = self.image_features.setdefault(c.seq, {})
                self._drop_passed(c.seq, cached)
                for i, im in enumerate(c.seq.images):
                    first, last = bisect.bisect_left(im.rows, c.start), bisect.bisect_left(im.rows, c.end)
                    if first == last:
                        continue
                    if i not in cached:
                        todo.append((cached, i, im))
                        cached[i] = None  # placeholder: filled below, in one batch
                    rows += [row + p - c.start for p in im.rows[first:last]]
                    parts.append((cached, i, first, last))
            elif c.seq in self.image_features:
                self._drop_passed(c.seq, self.image_features[c.seq])
            row += len(c.ids)
        if not rows:
            return None
        if todo:
            self._encode(todo)
        values = torch.cat([cached[i][first:last] for cached, i, first, last in parts]).to(self.dtype)
        return torch.tensor(rows, device=self.device), values  # in the model's dtype: what other ranks receive

    def _drop_passed(self, seq: Sequence, cached: dict[int, torch.Tensor]) -> None:
        """Forget the features of images that the target and the MTP caches have both passed."""
        done = min(seq.num_computed, seq.blocks.mtp_computed) if self.num_mtp else seq.num_computed
        for i in [i for i in cached if seq.images[i].end <= done]:
            del cached[i]

    @torch.inference_mode()
    def _encode(self, todo: list[tuple[dict, int, PlacedImage]]) -> None:
        """Features of new images: every global view in one batch, every crop in another; an image's
        rows are its crops' (in order), then its global view's."""
        vision = self.model.vision
        views = vision(torch.stack([im.image.pixels for _, _, im in todo]).to(self.device))
        crops = [im.image.crops for _, _, im in todo]
        crop_rows = vision(torch.cat(crops).to(self.device)).split([len(c) for c in crops]) \
            if sum(len(c) for c in crops) else [None] * len(todo)
        for (cached, i, _), view, crop in zip(todo, views, crop_rows):
            cached[i] = view if crop is None or not len(crop) else torch.cat([crop.flatten(0, 1), view])

    def _new_entries(self, chunks: list[Chunk]) -> list[int]:
        """(row, column, block) of every full-attention table entry the device does not have yet, flat."""
        out: list[int] = []
        for c in chunks:
            tables = c.seq.blocks
            for column in range(tables.synced, len(tables.full)):
                out += (tables.row, column, tables.full[column])
            tables.synced = len(tables.full)
        return out

    def _grow_full_table(self, rows: int) -> None:
        """The device table grows when a row lies past it."""
        if rows > self.full_table.shape[0]:
            grown = self.full_table.new_zeros(2 * rows, self.full_table.shape[1])
            grown[:self.full_table.shape[0]] = self.full_table
            self.full_table = grown


class Compiled:
    """`fn` through torch.compile (inductor; shapes dynamic, so one compilation serves every size;
    the sizes `unbacked(*args)` names, as (tensor, dim), get no variants of their own for 0 and 1
    either). Compiled code is cached on disk across runs (inductor's cache). If compiling fails (no
    working C++ toolchain, an unsupported torch), a warning and eager execution from then on: the same
    function, uncompiled. (A call run under a TorchDispatchMode is eager and stays so in that process:
    torch skips the code for good.)"""

    def __init__(self, fn: Callable, unbacked: Callable[..., list[tuple[torch.Tensor, int]]]) -> None:
        from torch._dynamo import config as dynamo_config  # dynamo and inductor: a second's import, only here
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import InductorError
        from torch.fx.experimental import _config as shape_config

        self.errors = (TorchDynamoException, InductorError)  # what a failed compile raises
        self.fn, self.unbacked = fn, unbacked
        self.compiled: Callable | None = torch.compile(
            fn, dynamic=True, options={"guard_filter_fn": _input_guards, "cpp_wrapper": True})
        # Process-wide (patching them around each call cost 50 us): floats (eps, rope theta) are
        # constants, not graph inputs (which restarts the analysis); no guards on sizes that are
        # equal by chance; room for more variants than the two a step kind needs.
        dynamo_config.specialize_float = True
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        shape_config.use_duck_shape = False

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                for tensor, dim in self.unbacked(*args):
                    torch._dynamo.decorators.mark_unbacked(tensor, dim)
                return self.compiled(*args)
            except self.errors as e:
                warnings.warn(f"torch.compile failed, running {self.fn.__name__} eagerly from now on: {e}",
                              stacklevel=2)
                self.compiled = None
        return self.fn(*args)


class CompiledStep(Compiled):
    """A step forward, compiled: `_pack` pads the dimensions other than the counts of rows, tiles and
    table columns (unbacked), and steps of one row get a variant of their own."""

    def __init__(self, forward: Callable[..., Logits | tuple], *defaults: int) -> None:
        """forward(step, logit_rows, *defaults): a runner's step method and its trailing arguments
        (MTP: the depth)."""
        super().__init__(_own_method(forward, defaults), _step_counts)


def _step_counts(step: StepInputs, logit_rows: torch.Tensor | tuple[torch.Tensor, ...],
                 *draws: DraftDraws | None) -> list[tuple[torch.Tensor, int]]:
    """A compiled step's counted dimensions: one graph for any count, 0 and 1 too."""
    rows = logit_rows if isinstance(logit_rows, tuple) else (logit_rows,)
    counts = [*rows, step.tiles, *step.tables.values(), *step.first_blocks.values(),
              *(t for d in draws if d is not None for t in vars(d).values())]
    return [(counted, 0) for counted in counts]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's options (glibc's malloc.h)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next allocation instead of handing it back to the
    OS (each block over 128 KB is its own mmap, unmapped when freed; the heap's top is trimmed).
    Otherwise every large tensor a CPU step makes (a step's gathered keys: tens of MB at 4K
    context) starts on fresh pages, one page fault per 4 KB, which at 16 sequences of 4K tokens
    more than doubled the step time. Process-wide, like PyTorch's caching allocator on a GPU: the
    process keeps its peak memory. Nothing happens where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for option in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD):
        mallopt(option, 1 << 30)


def _own_method(method: Callable, defaults: tuple) -> Callable:
    """A runner's bound `method` over a copy of its function's code object, its defaults replaced.
    torch.compile keeps compiled code per code object (and a partial would share its wrapper's),
    and the steps do not guard on the runner they belong to (_input_guards): another engine's
    runner, of another model maybe, must not find this one's."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, defaults, f.__closure__)
    return types.MethodType(own, method.__self__)


def _input_guards(guards: list) -> list[bool]:
    """The guards a compiled step keeps: those on its inputs (the StepInputs' tensors and sizes) and
    on torch's global state. None on the runner and the model: they do not change once
    built, and checking their hundreds of attributes on every call cost more than the step's host work."""
    modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(guards)
    return [keep and not g.name.startswith(("self", "G[")) and
            g.guard_type not in ("EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT")
            for g, keep in zip(guards, modules)]


ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.bool: "b"}  # array.array's, for Upload


class Upload:
    """Host arrays bound for the device, packed (array.array: several times faster than torch.tensor
    on Python lists) and sent in a single non-blocking copy from pinned memory, instead of one
    blocking copy (a wait for the device) per array. Each array is stored in its own dtype (from a
    64-bit boundary), so that on the device it is a view, not a conversion."""

    def __init__(self) -> None:
        self.data = array.array("q")
        self.parts: list[tuple[int, int, int, torch.dtype]] = []  # start (word), count, row width (0: 1-D), dtype
        self.on_device: torch.Tensor | None = None  # the arrays on a GPU, once sent

    def add(self, values: list, dtype: torch.dtype = torch.int64, width: int = 0) -> int:
        if len(self.data) % 2:
            self.data.append(0)  # each part 16-byte aligned (inductor copies misaligned inputs)
        start = len(self.data)
        if dtype == torch.int64:
            self.data.extend(values)
        else:
            raw = array.array(ARRAY_CODES[dtype], values).tobytes()
            self.data.frombytes(raw + bytes(-len(raw) % 8))
        self.parts.append((start, len(values), width, dtype))
        return len(self.parts) - 1

    def write(self, handle: int, values: list) -> None:
        """Overwrite part `handle` with as many values, in place (`resend` takes them to the device)."""
        start, count, _, dtype = self.parts[handle]
        code, per = ARRAY_CODES[dtype], 8 // dtype.itemsize
        memoryview(self.data).cast("B").cast(code)[start * per:start * per + count] = array.array(code, values)

    def resend(self) -> None:
        """The arrays again, into the device tensors `send` made (after `write`). On the CPU those
        tensors are views of the arrays: nothing to do."""
        if self.on_device is not None:
            self.on_device.copy_(torch.frombuffer(self.data, dtype=torch.int64).pin_memory(), non_blocking=True)

    def send(self, device: torch.device) -> Callable[[int | None], torch.Tensor | None]:
        """One copy to `device`; returns the lookup from `add`'s handles to device tensors. On the
        CPU no copy: each part is a tensor of its own over the array (which it keeps alive), from
        storage offset 0, so that a compiled step's inputs carry no offsets (each one an input that
        inductor's wrapper would turn into a tensor per call)."""
        if device.type == "cpu":
            def part(start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
                return torch.frombuffer(self.data, dtype=dtype, count=count, offset=8 * start) if count \
                    else torch.empty(0, dtype=dtype)
        else:
            flat = torch.frombuffer(self.data, dtype=torch.int64) if self.data else torch.zeros(0, dtype=torch.int64)
            flat = self.on_device = flat.pin_memory().to(device, non_blocking=True)
            views = {dtype: flat.view(dtype) for dtype in {p[3] for p in self.parts}}  # one view per dtype

            def part(start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
                return views[dtype].narrow(0, start * (8 // dtype.itemsize), count)

        def get(handle: int | None) -> torch.Tensor | None:
            if handle is None:
                return None
            start, count, width, dtype = self.parts[handle]
            got = part(start, count, dtype)
            return got.view(-1, width) if width else got

        return get


def draw_settings(up: Upload, params: list["SamplingParams"], seeds: list[int], lengths: list[int],
                  filters: bool = True) -> tuple[int, ...]:
    """Handles of the settings sampled rows draw with, one value per sequence, added to `up`: greedy,
    temperature (1 where greedy), seed, length (DraftDraws' fields), and where `filters` and any
    sequence filters, top-k (0: off), top-p and min-p (the sampler's plain_verify takes them all in
    this order)."""
    handles = (up.add([p.greedy for p in params], torch.bool),
               up.add([1.0 if p.greedy else p.temperature for p in params], torch.float32),
               up.add(seeds), up.add(lengths))
    if not filters or not any(p.filtered for p in params):
        return handles
    return handles + (up.add([max(p.top_k, 0) for p in params]), up.add([p.top_p for p in params], torch.float32),
                      up.add([p.min_p for p in params], torch.float32))


def _step_inputs(x: Inputs) -> StepInputs:
    ctx, d = x.ctx, x.ctx.decode
    return StepInputs(x.ids, x.positions, d.seq_of, d.q_pos, d.tiles, ctx.slots, ctx.tables, ctx.first_blocks,
                      x.prev_slots)


def _window_tables(chunks: list[Chunk], first: list[int], width: int) -> list[int]:
    """[chunks x width], flat: each chunk's sliding blocks from `first` on, padded with block 0 (keys
    past a row's position are masked). A block that left the window (NO_BLOCK, -1) is sent as it is:
    no row reads it (the kernels mask its positions, the twins clamp the table before gathering)."""
    out: list[int] = []
    for c, f in zip(chunks, first):
        blocks = c.seq.blocks.sliding[f:f + width]
        out += blocks
        out += [0] * (width - len(blocks))
    return out


def _slots(table: list[int], start: int, end: int, block_size: int) -> range | list[int]:
    """Cache slots of positions start..end-1: one range per block, not a Python step per token."""
    first, last = start // block_size, (end - 1) // block_size
    if first == last:  # within one block: most decode, verify and drafting chunks
        base = table[first] * block_size - first * block_size
        return range(base + start, base + end)
    out: list[int] = []
    for b in range(first, last + 1):
        base = table[b] * block_size - b * block_size
        out.extend(range(base + max(start, b * block_size), base + min(end, (b + 1) * block_size)))
    return out
