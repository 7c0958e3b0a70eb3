"""The server's engine: the step loop in a process of its own, behind an asyncio front.

Why a process: a step is Python driving many short torch calls, each of which releases the GIL and
takes it back. Sharing a process with the HTTP server, the step waited at each of those points for
the event loop (JSON, SSE, pydantic), which holds the GIL for up to the switch interval (5 ms). On
the CPU the server reached 0.81x the offline tokens/s at one stream that way, and 0.92x with the
engine in its own process (`benchmarks/serve_overhead.py` runs both; its 2026-11-28 results, MTP 0:
runs there vary by ~10%). vLLM (its engine core) and SGLang (its scheduler) run the loop in a
process of its own for the same reason.

The front keeps what the server needs before and after the engine: the tokenizer (chat templates,
logprob text), the model config and the image preprocessor (images are decoded here, not in the
engine's process). The engine process validates and queues requests (`LLMEngine.make_request`, the
one place for those checks), steps while any request is unfinished, and sends each step's deltas.
Messages are pickled over a socket pair private to the two processes (no other pickle is read).
"""

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path

from stepflash.config import EngineConfig, ModelConfig
from stepflash.engine.engine import EngineStats, LLMEngine, image_processor
from stepflash.engine.worker import RankFailure
from stepflash.outputs import RequestOutput
from stepflash.sampling import SamplingParams
from stepflash.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = str | list[int]
LONG_TEXT = 20_000  # characters: text tokenized in a worker thread, off the event loop


class EngineFailure(RuntimeError):
    """The engine could not serve a request: its step failed, or the engine has stopped. The message
    is the engine's own account of the cause; the server passes it on (500, or an error event)."""


class AsyncLLMEngine:
    """asyncio front: `add` queues a request once the engine has validated it (ValueError on bad
    input), `stream` yields its deltas (RequestOutputs holding what each step added; metrics only on
    the last) until finished (`generate` does both). A consumer that stops iterating (a client that
    disconnects) aborts its request, freeing its blocks at once. If the engine process fails for good
    (a tensor-parallel rank died, or the process itself), every open stream gets the error, `fatal`
    holds it and `on_fatal` is called."""

    def __init__(self, model_dir: str | Path, ec: EngineConfig | None = None, in_process: bool = False) -> None:
        """Start the engine process and wait until it is ready; its startup error (a bad option, a
        checkpoint that does not load) is raised here. `in_process`: the same loop and messages from
        a thread of this process instead (for tests that patch the engine's code)."""
        self.config = ec = ec or EngineConfig()
        self._conn, child = mp.Pipe()
        args = (child, str(model_dir), ec, logging.getLogger().getEffectiveLevel())
        if in_process:
            self._process: mp.Process | threading.Thread = threading.Thread(target=_engine_main, args=args,
                                                                           daemon=True, name="stepflash-engine")
        else:  # not a daemon: a tensor-parallel engine spawns its ranks
            self._process = mp.get_context("spawn").Process(target=_engine_main, args=args, name="stepflash-engine")
        self._process.start()
        if not in_process:
            child.close()
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self.tokenizer = Tokenizer.from_pretrained(model_dir)  # meanwhile the engine loads the model
            self.model_config = ModelConfig.from_pretrained(model_dir)
            self.images = image_processor(self.model_config, self.tokenizer, ec)
            kind, *ready = _receive(self._conn)
            if kind == "failed":
                raise ready[0]
        except EOFError:
            self.shutdown()
            raise RuntimeError(f"the engine process exited (code {self._exitcode}) while starting") from None
        except BaseException:
            self.shutdown()
            raise
        (self.max_model_len,) = ready
        self._queues: dict[str, asyncio.Queue] = {}
        self._added: dict[str, asyncio.Future] = {}  # first request id of an `add_all` -> its verdict
        self._stats: collections.deque[asyncio.Future] = collections.deque()
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}  # the engine sends a prompt once
        self._ids = itertools.count()
        self.fatal: Exception | None = None
        self.on_fatal: Callable[[Exception], None] | None = None

    # -- requests -------------------------------------------------------------------------------
    async def add(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                  images: list | None = None) -> str:
        """Queue a request once the engine has validated it (ValueError on bad input); its id."""
        request_id = request_id or f"req-{next(self._ids)}"
        await self.add_all([prompt], params, [request_id], [images or []])
        return request_id

    async def add_all(self, prompts: list[Prompt], params: SamplingParams | None, request_ids: list[str],
                      images: list[list] | None = None) -> None:
        """Queue one request per prompt, or none: a bad prompt fails them all (ValueError naming it)."""
        self._attach()
        if self.fatal is not None:
            raise EngineFailure(f"the engine has stopped: {self.fatal}")
        taken = [i for n, i in enumerate(request_ids) if i in self._queues or i in request_ids[:n]]
        if taken:
            raise ValueError(f"request id {taken[0]!r} is already in use")
        for request_id in request_ids:
            self._queues[request_id] = asyncio.Queue()
        try:
            tokenized = [await self._tokenize(p) for p in prompts]
            items = [(i, ids, text, params, im) for i, (ids, text), im in zip(request_ids, tokenized,
                                                                              images or [[]] * len(prompts))]
            verdict = self._added[request_ids[0]] = asyncio.get_running_loop().create_future()
            self._send(("add", items))
            await verdict
        except BaseException as e:
            for request_id in request_ids:
                self._queues.pop(request_id, None)
                if not isinstance(e, ValueError):  # e.g. the caller cancelled: the engine may have queued it
                    self.abort(request_id)
            raise
        finally:
            self._added.pop(request_ids[0], None)

    async def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; a long one in a worker thread, the event loop serving streams meanwhile."""
        if len(text) <= LONG_TEXT:
            return self.tokenizer.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode_unlocked, text, add_special_tokens)

    async def _tokenize(self, prompt: Prompt) -> tuple[Prompt, str | None]:
        """A text prompt's ids (and its text), here rather than in the engine's process, where a long
        one would hold up every running request's next step (a 100K-token prompt: ~0.2 s)."""
        if not isinstance(prompt, str):
            return prompt, None
        return await self.encode(prompt, add_special_tokens=True), prompt

    @property
    def num_active(self) -> int:
        """Requests added and not yet fully streamed."""
        return len(self._queues)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       images: list | None = None) -> AsyncIterator[RequestOutput]:
        async for out in self.stream(await self.add(prompt, params, request_id, images)):
            yield out

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        queue = self._queues[request_id]
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._prompts.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        if self.fatal is None:
            with contextlib.suppress(OSError):  # the engine is gone: its streams learn it from the reader
                self._send(("abort", request_id))

    def abort_all(self) -> None:
        for request_id in list(self._queues):
            self.abort(request_id)

    async def stats(self) -> EngineStats:
        self._attach()
        if self.fatal is not None:
            raise EngineFailure(f"the engine has stopped: {self.fatal}")
        reply = asyncio.get_running_loop().create_future()
        self._stats.append(reply)
        self._send(("stats",))
        return await reply

    def shutdown(self) -> None:
        """Stop the engine process (and its ranks); waits up to 30 s, then kills it."""
        if self._conn.closed:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        if self._process.is_alive():
            try:
                self._send(("stop",))
            except OSError:
                pass
            deadline = time.monotonic() + 30
            while self._process.is_alive() and time.monotonic() < deadline:
                try:  # read on: an engine blocked sending to this end would never see the stop
                    if self._conn.poll(0.05):
                        self._conn.recv_bytes()
                except (EOFError, OSError):
                    self._process.join(deadline - time.monotonic())
            if isinstance(self._process, mp.Process) and self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._conn.close()

    # -- the engine's messages ------------------------------------------------------------------
    def _attach(self) -> None:
        """Read the engine's messages on the running event loop (the server's, or a test's)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            loop.add_reader(self._conn.fileno(), self._on_readable)
            self._loop = loop

    def _send(self, message: tuple) -> None:
        _send(self._conn, message)

    @property
    def _exitcode(self) -> int | None:
        return getattr(self._process, "exitcode", None)

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._handle(*_receive(self._conn))
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            self._process.join(5)
            self._fail_all(EngineFailure(f"the engine process exited (code {self._exitcode})"))

    def _handle(self, kind: str, *body) -> None:
        if kind == "outputs":
            for out in body[0]:
                if out.request_id not in self._queues:  # its stream has closed
                    continue
                if out.prompt_token_ids is None:
                    out.prompt, out.prompt_token_ids = self._prompts[out.request_id]
                else:
                    self._prompts[out.request_id] = out.prompt, out.prompt_token_ids
                if out.finished:
                    del self._prompts[out.request_id]
                self._deliver(out.request_id, out)
        elif kind == "added":
            first, error, message = body
            if (verdict := self._added.get(first)) is not None and not verdict.done():
                if error is None:
                    verdict.set_result(None)
                else:
                    verdict.set_exception((ValueError if error == "ValueError" else EngineFailure)(message))
        elif kind == "stats":
            if not (reply := self._stats.popleft()).done():  # done: its caller was cancelled
                reply.set_result(body[0])
        elif kind == "step_failed":
            request_ids, message, fatal = body
            for request_id in request_ids:
                self._deliver(request_id, EngineFailure(f"engine step failed: {message}"))
            if fatal:
                self._fail_all(EngineFailure(message))

    def _fail_all(self, error: Exception) -> None:
        """The engine cannot go on: every stream and waiting call gets the error."""
        for request_id in list(self._queues):
            self._deliver(request_id, error)
        for future in [*self._added.values(), *self._stats]:
            if not future.done():
                future.set_exception(EngineFailure(f"the engine has stopped: {error}"))
        self._stats.clear()
        if self.fatal is None:
            self.fatal = error
            if self.on_fatal:
                self.on_fatal(error)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)


def _receive(conn: Connection) -> tuple:
    return pickle.loads(conn.recv_bytes())


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message))


# -- the engine's process -------------------------------------------------------------------------
def _engine_main(conn: Connection, model_dir: str, ec: EngineConfig, log_level: int) -> None:
    if threading.current_thread() is threading.main_thread():  # its own process
        for signum in (signal.SIGINT, signal.SIGTERM):  # sent to the process group (Ctrl-C, a service manager):
            signal.signal(signum, signal.SIG_IGN)  # the front finishes open streams, then stops this process
    logging.basicConfig(level=log_level, format="%(message)s")
    try:
        engine = LLMEngine(model_dir, ec)
    except Exception as e:  # the front raises it: a bad option or checkpoint is the CLI's usual error
        try:
            _send(conn, ("failed", e))
        except (pickle.PicklingError, TypeError, AttributeError):
            _send(conn, ("failed", RuntimeError(f"{type(e).__name__}: {e}")))
        return
    try:
        _send(conn, ("ready", engine.max_model_len))
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_pump, args=(conn, inbox), daemon=True, name="stepflash-inbox").start()
        EngineLoop(engine, lambda message: _send(conn, message), inbox).run()
    finally:
        engine.shutdown()


def _pump(conn: Connection, inbox: queue.SimpleQueue) -> None:
    """The front's messages into `inbox` as they come (so a large one never waits for a step), and a
    stop when the front is gone."""
    try:
        while True:
            inbox.put(_receive(conn))
    except (EOFError, OSError):
        inbox.put(("stop",))


class EngineLoop:
    """Steps while a request is unfinished; between steps, applies the front's messages."""

    def __init__(self, engine: LLMEngine, send: Callable[[tuple], None], inbox: queue.SimpleQueue) -> None:
        self.engine, self.send, self.inbox = engine, send, inbox
        self.prompt_sent: set[str] = set()  # requests whose prompt went with an earlier delta

    def run(self) -> None:
        while True:
            idle = not self.engine.has_unfinished_requests()
            messages = [self.inbox.get()] if idle else []
            while not self.inbox.empty():
                messages.append(self.inbox.get())
            for kind, *body in messages:
                if kind == "stop":
                    return
                getattr(self, "_" + kind)(*body)
            if self.engine.has_unfinished_requests() and not self._step():
                return

    def _step(self) -> bool:
        """One step; False when the engine cannot go on (a tensor-parallel rank failed)."""
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step must not hang every stream: fail them all
            log.exception("engine step failed")
            fatal = isinstance(e, RankFailure)
            self.send(("step_failed", self.engine.abort_all(), str(e), fatal))
            self.prompt_sent.clear()
            return not fatal
        if outputs:
            self.send(("outputs", [self._wire(out) for out in outputs]))
        return True

    def _wire(self, out: RequestOutput) -> RequestOutput:
        """A delta as sent: its request's whole prompt only the first time (the front keeps it: a
        100K-token prompt would cost milliseconds a step to pickle and unpickle), its metrics only
        when it is the last (half the cost of pickling a short delta)."""
        changes = {"prompt": None, "prompt_token_ids": None} if out.request_id in self.prompt_sent else {}
        if out.finished:
            self.prompt_sent.discard(out.request_id)
        else:
            self.prompt_sent.add(out.request_id)
            changes["metrics"] = None
        return dataclasses.replace(out, **changes) if changes else out

    def _add(self, items: list[tuple[str, Prompt, str | None, SamplingParams | None, list]]) -> None:
        """All of the requests, or none (the first error, naming the prompt when there are several)."""
        requests = []
        for i, (request_id, prompt, text, params, images) in enumerate(items):
            try:
                requests.append(self.engine.make_request(request_id, prompt, params, images, text))
            except Exception as e:  # ValueError: bad input (HTTP 400); anything else is a bug, logged
                if not isinstance(e, ValueError):
                    log.exception("request %s could not be made", request_id)
                self.send(("added", items[0][0], type(e).__name__, f"prompt {i}: {e}" if len(items) > 1 else str(e)))
                return
        for request in requests:
            self.engine.enqueue(request)
        self.send(("added", items[0][0], None, None))

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self.prompt_sent.discard(request_id)

    def _stats(self) -> None:
        self.send(("stats", self.engine.stats()))
