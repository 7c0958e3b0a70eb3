"""Graphed decode/verify steps (engine/graphs.py) and the kernel path's one-copy inputs. Without
CUDA, cuda_graphs="on" runs the bucketed static-buffer step eagerly: these tests check its padding
and buffer reuse, not the capture itself; with CUDA the steps are captured and replayed. The engines
run in fp32 everywhere (a GPU's default would be the checkpoint's bf16), so the logprobs agree to
1e-4."""

import pytest
import torch

from stepflash.config import EngineConfig
from stepflash.engine.engine import LLMEngine
from stepflash.engine.graphs import graph_buckets
from stepflash.sampling import SamplingParams
from checkpoints import write_checkpoint
from stepflash.train.configs import tiny_config


def test_graph_buckets_cover_every_row_count():
    assert graph_buckets(1) == [1]
    assert graph_buckets(8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert graph_buckets(30) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 30]
    assert graph_buckets(100)[-5:] == [56, 64, 80, 96, 100]
    for max_rows in (1, 7, 33, 69, 256):
        buckets = graph_buckets(max_rows)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_rows
        for rows in range(1, max_rows + 1):  # the bucket a step lands in wastes at most a quarter
            bucket = next(b for b in buckets if b >= rows)
            assert bucket - rows <= max(3, bucket // 4)


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], late: int) -> list:
    """The requests to completion; the last `late` of them arrive after the first step."""
    early, outputs = len(prompts) - late, {}

    def step() -> None:
        for delta in engine.step():
            if delta.request_id in outputs:
                outputs[delta.request_id].add(delta)
            else:
                outputs[delta.request_id] = delta

    for i, (p, sp) in enumerate(zip(prompts, params)):
        if i == early:
            step()
        engine.add_request(str(i), p, sp)
    while engine.has_unfinished_requests():
        step()
    return [outputs[str(i)].outputs[0] for i in range(len(prompts))]


@pytest.mark.parametrize("mtp", [0, 3])
def test_graphed_steps_match_the_eager_path(tmp_path, mtp):
    """Same greedy tokens and logprobs with graphed steps (ragged batches padded into buckets of 1, 2,
    4, ... rows; with MTP, verify steps of 4 rows per sequence) as on the PyTorch path, and the cache
    blocks the KV manager owns hold the same keys and values: padding rows wrote to the scratch
    block only."""
    ckpt = write_checkpoint(tmp_path, tiny_config(), seed=3)
    gen = torch.Generator().manual_seed(1)
    # short prompts, prefilled in one graphed step of 17 rows (the 20-row bucket: 3 padding rows),
    # then one past the window of 16 (its sliding tables start after block 0)
    prompts = [torch.randint(10, 300, (n,), generator=gen).tolist() for n in (3, 7, 2, 5, 37)]
    # requests that end at different steps: the batch shrinks through the buckets
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=0, ignore_eos=True) for n in (9, 5, 2, 3, 6)]
    engines, outputs = {}, {}
    common = dict(mtp=mtp, dtype="float32", kv_cache_bytes=16_000_000)  # both engines number blocks alike
    for path, cfg in (("eager", EngineConfig(**common)),
                      ("graphs", EngineConfig(kernels="triton", cuda_graphs="on", **common))):
        engines[path] = engine = LLMEngine(ckpt, cfg)
        outputs[path] = _run(engine, prompts, params, late=1)
    graphs = engines["graphs"].runner.graphs
    assert engines["eager"].runner.graphs is None
    assert graphs.replays > 0 and len(graphs.static) >= 2  # several buckets were used
    assert all(g.replays > 0 for g in engines["graphs"].runner.mtp_graphs)  # drafting passes too
    assert all(g.too_big == 0 for g in [graphs, *engines["graphs"].runner.mtp_graphs])  # none fell back
    for a, b in zip(outputs["eager"], outputs["graphs"]):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t] - lb[t]) < 1e-4
    eager, graphed = engines["eager"].runner, engines["graphs"].runner
    assert eager.scratch == graphed.scratch
    for layer, (k, v) in eager.caches.items():
        managed = eager.scratch[eager.kind_of[layer]]
        torch.testing.assert_close(graphed.caches[layer][0][:managed], k[:managed], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(graphed.caches[layer][1][:managed], v[:managed], atol=1e-4, rtol=1e-4)
        if layer < engines["graphs"].model_config.num_hidden_layers:  # MTP layers are not graphed
            assert graphed.caches[layer][0][managed].abs().sum() > 0  # the padding rows wrote somewhere


def test_graph_settings_are_checked(tmp_path):
    ckpt = write_checkpoint(tmp_path, tiny_config(), seed=3)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        LLMEngine(ckpt, EngineConfig(cuda_graphs="maybe", dtype="float32"))
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        LLMEngine(ckpt, EngineConfig(cuda_graphs="on", kernels="torch", dtype="float32"))
    # auto: on with the kernels on CUDA only
    graphs = LLMEngine(ckpt, EngineConfig(kernels="triton", dtype="float32")).runner.graphs
    assert (graphs is not None) == torch.cuda.is_available()


def test_upload_round_trips_every_array():
    """The one-copy packing gives back each array as added: int64, int32 rows, floats, bools."""
    from stepflash.engine.runner import Upload

    up = Upload()
    a = up.add([5, -1, 7])
    b = up.add([3, 4, 5, 6], dtype=torch.int32, width=2)
    c = up.add([0.5, -float("inf"), 1e-30], dtype=torch.float32)
    d = up.add([])
    e = up.add([1, 0, 1], dtype=torch.bool)
    got = up.send(torch.device("cpu"))
    assert got(a).tolist() == [5, -1, 7] and got(a).dtype == torch.int64
    assert got(b).tolist() == [[3, 4], [5, 6]] and got(b).dtype == torch.int32
    assert got(c).tolist() == [0.5, -float("inf"), torch.tensor(1e-30).item()] and got(c).dtype == torch.float32
    assert got(d).numel() == 0 and got(None) is None
    assert got(e).tolist() == [True, False, True]
