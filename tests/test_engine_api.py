"""Engine behaviour around the model: stop conditions, text streaming, abort, errors, async front."""

import asyncio
import contextlib
import dataclasses
import time

import pytest

from stepflash import LLM, SamplingParams
from stepflash.config import EngineConfig
from stepflash.engine.front import AsyncLLMEngine
from checkpoints import write_checkpoint

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12, 200]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("api"), seed=8)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt), max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def front(ckpt):
    """The server's engine: the same options, in a process of its own."""
    engine = AsyncLLMEngine(ckpt, EngineConfig(max_num_batched_tokens=64))
    yield engine
    engine.shutdown()


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, "ignore_eos": True, **kw})


def used_blocks(llm: LLM) -> int:
    return sum(kind["used"] for kind in llm.get_stats().kv_blocks.values())


def test_max_tokens_and_stop_token_ids(llm):
    full = llm.generate([PROMPT], greedy())[0].outputs[0]
    assert len(full.token_ids) == 24 and full.finish_reason == "length"
    stop = full.token_ids[5]
    first = full.token_ids.index(stop)
    out = llm.generate([PROMPT], greedy(stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stop_strings_cut_the_text(llm):
    full = llm.generate([PROMPT], greedy(skip_special_tokens=False))[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.index(stop)
    out = llm.generate([PROMPT], greedy(stop=[stop], skip_special_tokens=False))[0].outputs[0]
    assert out.text == full[:cut] and (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = llm.generate([PROMPT], greedy(stop=stop, include_stop_str_in_output=True, skip_special_tokens=False))
    assert kept[0].outputs[0].text == full[: cut + len(stop)]


def test_min_tokens_holds_back_stop_tokens(llm):
    full = llm.generate([PROMPT], greedy())[0].outputs[0]
    stop = full.token_ids[0]
    out = llm.generate([PROMPT], greedy(stop_token_ids=[stop], min_tokens=4))[0].outputs[0]
    assert len(out.token_ids) >= 4 and stop not in out.token_ids[:4]


def test_a_temperature_near_zero_samples_the_greedy_tokens(llm):
    """Below 1e-5 a temperature is greedy (as vLLM): dividing the logits by 1e-300 (0 in fp32) made
    every probability NaN, and every draw token 0."""
    expected = llm.generate([PROMPT], greedy(max_tokens=6))[0].outputs[0].token_ids
    for temperature in (1e-300, 1e-6):
        out = llm.generate([PROMPT], SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True, seed=1))
        assert out[0].outputs[0].token_ids == expected


def test_siblings_of_the_largest_seed_sample(llm):
    """n > 1 siblings draw with the seed + their index, kept within 64 bits (the seed 2**63 - 1 + 1
    once failed the engine's step: the sampler sends seeds as int64)."""
    params = SamplingParams(temperature=1.0, n=3, seed=2**63 - 1, max_tokens=4, ignore_eos=True)
    out = llm.generate([PROMPT], params)[0]
    assert [len(c.token_ids) for c in out.outputs] == [4, 4, 4]
    # sibling 1's seed wraps to -2**63: it samples what a request of that seed samples alone
    alone = llm.generate([PROMPT], dataclasses.replace(params, n=1, seed=-2**63))[0].outputs[0]
    assert out.outputs[1].token_ids == alone.token_ids


def test_bad_requests_fail_clearly_and_change_nothing(llm):
    cases = [
        ([], SamplingParams(), "empty"),
        ([10**6], SamplingParams(), "outside the vocabulary"),
        (PROMPT, SamplingParams(max_tokens=10**6), "exceeds max_model_len"),
        (PROMPT, SamplingParams(n=10**3), "exceeds max_num_seqs"),
        (PROMPT, SamplingParams(stop_token_ids=[10**6]), "outside the vocabulary"),
        (3.5, SamplingParams(), "string or a list of token ids"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPT, prompt], params)  # the good prompt must not run either
        assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert llm.generate([PROMPT], greedy(max_tokens=3))[0].outputs[0].finish_reason == "length"


def test_unsupported_options_are_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path)
    for kwargs, message in [({"mtp": 4}, "mtp must be in 0..3"), ({"mtp": -1}, "mtp"), ({"quantization": "int4"}, "quantization"),
                            ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
                            ({"tensor_parallel_size": 3}, "tensor_parallel_size=3 does not divide"),
                            ({"block_size": 12}, "power of two"),
                            ({"kv_cache_bytes": 10_000, "max_model_len": 4096}, "kv_cache_bytes")]:
        with pytest.raises(ValueError, match=message):
            LLM(str(ckpt), **kwargs)


def test_small_kv_cache_lowers_concurrency_and_chunk_to_fit(tmp_path):
    """Settings left open shrink until one sequence of the whole context fits; settings given are kept,
    and a budget they cannot fit is refused naming what to change."""
    ckpt = write_checkpoint(tmp_path, seed=8)
    budget = 4_000_000  # one 4096-token sequence, but not 64 sliding windows and a 1024-token chunk
    llm = LLM(str(ckpt), kv_cache_bytes=budget)
    layout = llm.engine.layout
    assert layout.max_model_len == 4096 and layout.max_num_seqs < 64 and layout.max_num_batched_tokens < 1024
    outs = llm.generate([PROMPT, PROMPT[:5], PROMPT[3:]], greedy(max_tokens=4))
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4, 4]
    with pytest.raises(ValueError, match="raise kv_cache_bytes or lower max_model_len, max_num_seqs"):
        LLM(str(ckpt), kv_cache_bytes=budget, max_num_seqs=64)


def test_async_stream_deltas_concatenate_to_the_final_output(llm, front):
    async def run() -> list:
        return [out async for out in front.generate(PROMPT, greedy(skip_special_tokens=False, stop=["zz"],
                                                                       logprobs=2))]

    deltas = asyncio.run(run())
    final = llm.generate([PROMPT], greedy(skip_special_tokens=False, stop=["zz"], logprobs=2))[0].outputs[0]
    assert len(deltas) > 1 and [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert all(d.prompt_token_ids == PROMPT for d in deltas)  # sent once by the engine, on every delta here
    assert [d.metrics is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].metrics.num_generated_tokens == len(final.token_ids)
    completions = [c for d in deltas for c in d.outputs]
    assert sum(len(c.token_ids) for c in completions[:-1]) < len(final.token_ids)  # each delta only what is new
    assert "".join(c.text for c in completions) == final.text
    assert [t for c in completions for t in c.token_ids] == final.token_ids
    assert [lp for c in completions for lp in c.logprobs] == final.logprobs
    assert completions[-1].finish_reason == final.finish_reason == "length"


def test_async_abort_frees_blocks_and_spares_other_requests(llm, front):
    async def run() -> tuple[list[int], int, object]:
        async def consume(params: SamplingParams, stop_after: int | None) -> list[int]:
            tokens: list[int] = []
            async with contextlib.aclosing(front.generate(PROMPT, params)) as stream:  # closed (aborting) at break
                async for out in stream:
                    tokens += out.outputs[0].token_ids if out.outputs else []
                    if stop_after is not None and len(tokens) >= stop_after:
                        break  # a client going away mid-stream
            return tokens

        survivor, aborted = await asyncio.gather(consume(greedy(), None), consume(greedy(max_tokens=200), 3))
        for _ in range(100):  # the survivor's blocks: freed after one more (MTP catch-up) step
            stats = await front.stats()
            if not stats.num_running and not sum(kind["used"] for kind in stats.kv_blocks.values()):
                break
            await asyncio.sleep(0.02)
        return survivor, len(aborted), stats

    survivor, aborted_len, stats = asyncio.run(run())
    assert aborted_len == 3
    assert survivor == llm.generate([PROMPT], greedy())[0].outputs[0].token_ids
    assert sum(kind["used"] for kind in stats.kv_blocks.values()) == 0
    assert stats.num_running == stats.num_waiting == 0 and front.num_active == 0


def test_async_rejects_bad_input_at_submission_and_several_prompts_all_or_none(front):
    async def run() -> tuple[object, object]:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in front.generate([10**6], SamplingParams()):
                pass
        with pytest.raises(ValueError, match="prompt 1: .*max_model_len"):
            await front.add_all([PROMPT, PROMPT * 1000], greedy(), ["good", "long"])
        with pytest.raises(ValueError, match="'twice' is already in use"):
            await front.add_all([PROMPT, PROMPT], greedy(), ["twice", "twice"])
        return await front.stats(), front.num_active

    stats, active = asyncio.run(run())
    assert stats.num_running == stats.num_waiting == 0 and active == 0  # the good prompt was not queued


def test_the_engine_sends_a_requests_prompt_with_its_first_delta_only_and_metrics_with_its_last():
    from stepflash.engine.front import EngineLoop
    from stepflash.outputs import RequestMetrics, RequestOutput

    def delta(request_id: str, finished: bool = False) -> RequestOutput:
        return RequestOutput(request_id, "text", PROMPT, None, [], finished, RequestMetrics(0.0))

    loop = EngineLoop(None, None, None)
    sent = [loop._wire(d) for d in (delta("a"), delta("b", True), delta("a"), delta("a", True), delta("a"),
                                    delta("b"))]
    assert [d.prompt_token_ids is not None for d in sent] == [True, True, False, False, True, True]
    assert [d.prompt is not None for d in sent] == [True, True, False, False, True, True]
    assert [d.metrics is not None for d in sent] == [False, True, False, True, False, False]


def test_async_text_prompts_are_tokenized_by_the_front_as_the_engine_would(llm, front):
    text = "def fib(n):\n    return n\n"

    async def run() -> tuple[list, list[int]]:
        long = text * 1000  # past LONG_TEXT: tokenized in a worker thread
        return [out async for out in front.generate(text, greedy(max_tokens=3))], await front.encode(long, True)

    deltas, long_ids = asyncio.run(run())
    offline = llm.generate([text], greedy(max_tokens=3))[0]
    assert all(d.prompt == text and d.prompt_token_ids == offline.prompt_token_ids for d in deltas)
    assert [t for d in deltas for c in d.outputs for t in c.token_ids] == offline.outputs[0].token_ids
    assert long_ids == llm.tokenizer.encode(text * 1000, add_special_tokens=True)


def test_async_add_cancelled_by_its_caller_leaves_nothing_running(front):
    async def run() -> object:
        add = asyncio.create_task(front.add(PROMPT, greedy(max_tokens=4000)))  # ~10 s of decoding, if it ran
        await asyncio.sleep(0)  # sent
        add.cancel()
        for _ in range(150):
            stats = await front.stats()
            if not stats.num_running and not stats.num_waiting:
                break
            await asyncio.sleep(0.02)
        return stats

    stats = asyncio.run(run())
    assert stats.num_running == stats.num_waiting == 0 and front.num_active == 0


def test_health_is_503_once_the_engine_process_is_gone(ckpt):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from stepflash.server.app import create_app

    front = AsyncLLMEngine(ckpt, EngineConfig(max_num_batched_tokens=64))
    try:
        with TestClient(create_app(front, "m")) as http:
            assert http.get("/metrics").status_code == 200 and http.get("/health").json() == {"status": "ok"}
            front._process.kill()
            for _ in range(200):
                if (health := http.get("/health")).status_code != 200:
                    break
                time.sleep(0.05)
            assert health.status_code == 503 and "engine process exited" in health.json()["error"]["message"]
    finally:
        front.shutdown()


def test_async_engine_reports_startup_errors_and_a_dead_engine(ckpt):
    with pytest.raises(ValueError, match="block_size"):
        AsyncLLMEngine(ckpt, EngineConfig(block_size=12))
    front = AsyncLLMEngine(ckpt, EngineConfig(max_num_batched_tokens=64))
    fatal = []
    front.on_fatal = fatal.append

    async def run() -> None:
        stream = front.generate(PROMPT, greedy(max_tokens=200))
        await stream.__anext__()
        front._process.kill()  # the engine's process dies mid-request
        with pytest.raises(RuntimeError, match="engine process exited"):
            async with asyncio.timeout(30):  # not a hang
                async for _ in stream:
                    pass
        with pytest.raises(RuntimeError, match="engine has stopped"):
            await front.add(PROMPT, greedy())

    try:
        asyncio.run(run())
    finally:
        front.shutdown()
    assert len(fatal) == 1 and front.fatal is fatal[0]


def test_chat_renders_the_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    out = llm.chat(messages, greedy(max_tokens=4))[0]
    expected = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages))
    assert out.prompt_token_ids == expected
    assert out.metrics.ttft is not None and out.metrics.ttft >= 0


def test_logit_bias_forces_a_token(llm):
    out = llm.generate([PROMPT], greedy(max_tokens=5, logit_bias={123: 100.0}))[0].outputs[0]
    assert out.token_ids == [123] * 5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([PROMPT], greedy(logit_bias={10**6: 1.0}))


def test_device_block_tables_follow_the_host_with_new_entries_only(llm):
    """Each step uploads only full-attention table entries the device lacks (a decode step of a long
    sequence: at most the block it grows into, or one a trim dropped), and the device copy always
    equals the KV manager's table. (Sliding tables, a window long, are sent whole with each call.)"""
    engine, runner = llm.engine, llm.engine.runner
    uploaded = []
    new_entries = runner._new_entries
    runner._new_entries = lambda chunks: uploaded.append(out := new_entries(chunks)) or out
    try:
        engine.add_request("long", PROMPT * 12, greedy(max_tokens=40))
        engine.add_request("short", PROMPT[:3], greedy(max_tokens=30))
        steps = 0
        while engine.has_unfinished_requests():
            uploaded.clear()
            engine.step()
            steps += 1
            running = engine.scheduler.running
            for seq in running:
                host = seq.blocks.full
                assert runner.full_table[seq.blocks.row, :len(host)].tolist() == host
            if steps > 2 and running and all(not s.is_prefilling for s in running):
                assert sum(len(u) for u in uploaded) // 3 <= 2 * len(running)
    finally:
        runner._new_entries = new_entries
    assert steps > 10
