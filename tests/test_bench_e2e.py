"""`stepflash bench`, `eval` and `report` end to end against a real server running the bundled model."""

import json

import pytest

from stepflash.cli import main
from stepflash.models import default_model_dir


@pytest.fixture(scope="module")
def server():
    from test_server import serving

    with serving(default_model_dir(), "--api-key", "k", name="bundled") as base:
        yield base


def test_bench_eval_report(server, tmp_path):
    out = tmp_path / "results"
    common = ["--base-url", server, "--model", "bundled", "--api-key", "k", "--output-dir", str(out)]
    assert main(["bench", *common, "--input-len", "120", "--output-len", "12", "--num-requests", "3",
                 "--concurrency", "1,2", "--warmup", "1", "--label", "bundled", "--completions"]) == 0
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "def add(a, b):\n    return a +", "answer": "b", "scorer": "contains"},
        {"prompt": "x = 1\ny =", "answer": "unlikely-answer-text", "scorer": "exact"},
    ]) + "\n")
    assert main(["eval", *common, "--task", "jsonl", "--data", str(tasks), "--max-tokens", "8", "--completions"]) == 0
    benches = sorted(out.glob("bench-*.json"))
    evals = sorted(out.glob("eval-*.json"))
    assert len(benches) == 2 and len(evals) == 1
    for path, concurrency in zip(benches, (1, 2)):
        r = json.loads(path.read_text())
        assert r["kind"] == "bench" and r["completed"] == 3 and r["failed"] == 0
        assert r["workload"]["concurrency"] == concurrency and r["label"] == "bundled"
        assert r["output_tokens"] == 36  # fixed lengths: the server honoured ignore_eos / min_tokens
        for key in ("ttft_s", "tpot_s", "itl_s", "e2el_s", "output_speed_tok_s", "e2e_500_s"):
            assert set(r[key]) == {"mean", "median", "p50", "p90", "p99"} and r[key]["median"] > 0
        assert r["spec_decode"]["verify_steps"] > 0 and r["spec_decode"]["tau"] >= 1.0
        assert r["environment"]["python"] and r["endpoint"]["model"] == "bundled"
    e = json.loads(evals[0].read_text())
    assert e["kind"] == "eval" and e["items"] == 2 and e["failed_requests"] == 0
    assert e["results"][1]["correct"] is False and e["output_tokens_per_task"] > 0
    charts = tmp_path / "charts"
    assert main(["report", *map(str, benches + evals), "--out", str(charts)]) == 0
    for name in ("throughput_vs_concurrency.png", "latency_percentiles.png", "intelligence_vs_speed.png"):
        assert (charts / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_an_unreachable_endpoint_without_hanging(tmp_path):
    from test_server import _free_port

    out = tmp_path / "r"
    assert main(["bench", "--base-url", f"http://127.0.0.1:{_free_port()}", "--model", "x", "--num-requests", "2",
                 "--warmup", "0", "--output-len", "4", "--timeout", "5", "--output-dir", str(out)]) == 0
    r = json.loads(next(out.glob("*.json")).read_text())
    assert r["completed"] == 0 and r["failed"] == 2 and "ConnectError" in r["errors"][0]


def test_bench_takes_the_served_model_and_reruns_miss_the_prefix_cache(server, tmp_path):
    """No --model: the endpoint's first model. Without --seed each run's prompts are its own, so a
    rerun against the warm server finds nothing in the prefix cache; with --seed a rerun repeats them."""
    def run(*extra: str) -> dict:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert main(["bench", "--base-url", server, "--api-key", "k", "--input-len", "100", "--output-len", "2",
                     "--num-requests", "2", "--warmup", "0", "--completions", "--output-dir", str(out), *extra]) == 0
        return json.loads(next(out.glob("bench-*.json")).read_text())

    first, second = run(), run()
    assert first["endpoint"]["model"] == "bundled" and first["completed"] == 2
    assert second["prefix_cache_hit_rate"] == 0.0
    run("--seed", "7")
    repeated = run("--seed", "7")
    assert repeated["prefix_cache_hit_rate"] > 0.5
