"""Schema-driven fuzzing of a real `stepflash serve` process: schemathesis generates requests from the
server's own /openapi.json for every operation; none may get a 5xx or leave KV blocks in use."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import BaseSchema, Case  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from checkpoints import write_checkpoint  # noqa: E402
from test_server import SERVING  # noqa: E402
from stepflash.train.configs import tiny_config

KEY = "fuzz-key-456"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _kv_blocks_in_use(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("stepflash_kv_blocks_used"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpt: Path = write_checkpoint(tmp_path_factory.mktemp("fuzz-tiny"), tiny_config())
    log = ckpt / "server.log"  # a file, not a pipe: hundreds of access-log lines would fill an undrained pipe
    # A short context keeps every generated request (max_tokens unset, n up to max_num_seqs) fast; port 0:
    # one the OS picks, named in the startup line
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stepflash.cli", "serve", "--model", str(ckpt), "--port", "0",
                                 "--served-model-name", MODEL, "--api-key", KEY, "--max-model-len", "64",
                                 "--max-num-seqs", "8", "--max-num-batched-tokens", "256"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        if base is None:
            match = SERVING.search(log.read_text(errors="replace"))
            base = match and match.group(1)
            time.sleep(0.2)
            continue
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("server did not become healthy within 60 s")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str) -> BaseSchema:
    return schemathesis.openapi.from_url(fuzz_server + "/openapi.json", timeout=10)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # slow on a busy box
def test_no_server_errors(case: Case, fuzz_server: str) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL  # a random name only ever gets 404: let the rest of the body reach the engine
    case.call_and_validate(base_url=fuzz_server, headers=AUTH, checks=[not_a_server_error], timeout=30)


def test_server_is_healthy_and_idle_after_fuzzing(fuzz_server: str) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    r = httpx.post(fuzz_server + "/v1/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    deadline = time.monotonic() + 10
    while _kv_blocks_in_use(fuzz_server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _kv_blocks_in_use(fuzz_server) == 0
