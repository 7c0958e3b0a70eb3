"""The eval sandbox against hostile programs, each checked from the host side (nothing reached the
port, no file appeared, no process survives, the secret was not read), benign programs that still
pass, and `stepflash eval` refusing code tasks where no sandbox can be made.

The sandboxed tests skip, saying why, where bubblewrap cannot run (`apt-get install bubblewrap`)."""

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stepflash.bench.evals import Item, run_program, score
from stepflash.bench.sandbox import UNCONFINED, Limits, Sandbox, SandboxUnavailable, bubblewrap
from stepflash.cli import main

SLEEP = shutil.which("sleep") or "/usr/bin/sleep"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    try:
        return bubblewrap()
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox on this machine: {e}")


@pytest.fixture
def without_bwrap(monkeypatch, tmp_path) -> Iterator[Path]:
    """PATH is an empty folder (put a fake bwrap there to have one that fails)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    bubblewrap.cache_clear()
    yield tmp_path
    bubblewrap.cache_clear()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A host folder anyone may read and write: only the sandbox's view of the filesystem protects it."""
    with tempfile.TemporaryDirectory(prefix="stepflash-sandbox-test-") as path:
        os.chmod(path, 0o1777)
        yield Path(path)


def processes_with(marker: str) -> list[int]:
    """Live processes (seen from the host) whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_benign_programs_pass_and_limits_hold(sandbox):
    assert run_program("assert 1 + 1 == 2", sandbox) == (True, "passed")
    assert run_program("assert 1 + 1 == 3", sandbox)[1] == "AssertionError"
    work = ("import subprocess, sys, tempfile\nopen('out.txt', 'w').write('x')\ntempfile.TemporaryFile().write(b'y')\n"
            "assert subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True).stdout == b'42\\n'")
    assert run_program(work, sandbox) == (True, "passed")
    item = Item("t", "import math\n\ndef root(x):\n", "", "program", "def check(f):\n    assert f(16) == 4\n", "root")
    assert score(item, "    return math.isqrt(x)\n\nprint('trailing junk')", sandbox) == (True, "passed")
    assert not score(item, "    return x\n", sandbox)[0]
    assert run_program("while True: pass", sandbox, Limits(seconds=1)) == (False, "timeout")
    assert not run_program("open('out.txt', 'w').write('y' * (4 << 20))", sandbox)[0]  # file size
    assert "MemoryError" in run_program("x = bytearray(2 << 30)", sandbox)[1]
    fill = "for i in range(100):\n    open(f'f{i}', 'w').write('y' * (1 << 20))"
    assert "No space left" in run_program(fill, sandbox, Limits(tmpfs_bytes=8 << 20))[1]


def test_no_network(sandbox):
    abstract = f"\0stepflash-test-{uuid.uuid4().hex}"
    with socket.create_server(("127.0.0.1", 0)) as tcp, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(abstract)
        unix.listen()
        port = tcp.getsockname()[1]
        attack = f"""
import _socket, importlib, socket, sys
def raw():  # below the socket module
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM); s.connect(("127.0.0.1", {port})); s.send(b"x")
def reloaded():
    importlib.reload(socket).create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"x")
def abstract_unix():  # the host's abstract sockets (X11, D-Bus, ...)
    s = socket.socket(socket.AF_UNIX); s.connect({abstract!r}); s.sendall(b"x")
reached = []
for attempt in (raw, reloaded, abstract_unix):
    try:
        attempt(); reached.append(attempt.__name__)
    except OSError as e:
        print(attempt.__name__, e, file=sys.stderr)
assert not reached, reached
"""
        assert run_program(attack, sandbox) == (True, "passed")
        for listener in (tcp, unix):
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):  # no connection waits in the backlog
                listener.accept()


def test_no_writes_to_the_host(sandbox, open_dir):
    targets = [open_dir / "pwned", Path(sys.prefix) / f"pwned-{uuid.uuid4().hex}"]  # the prefix is visible
    attack = f"""
wrote = []
for path in {[str(t) for t in targets]!r}:
    try:
        open(path, "w").write("x"); wrote.append(path)
    except OSError:
        pass
assert not wrote, wrote
"""
    try:
        assert run_program(attack, sandbox) == (True, "passed")
        assert not any(t.exists() for t in targets)
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_home_and_host_files_are_not_readable(sandbox, open_dir):
    secret = uuid.uuid4().hex
    in_home = Path.home() / f".stepflash-sandbox-test-{uuid.uuid4().hex}"
    in_open_dir = open_dir / "token"
    for path in (in_home, in_open_dir):
        path.write_text(secret)
        path.chmod(0o644)
    attack = f"""
import glob, os, sys
for path in [{str(in_home)!r}, {str(in_open_dir)!r}, *glob.glob(os.path.expanduser("~/.stepflash-sandbox-test-*"))]:
    try:
        print("read", open(path).read(), file=sys.stderr)
    except OSError as e:
        print(path, type(e).__name__, file=sys.stderr)
"""
    try:
        outcome = sandbox.run(attack)
    finally:
        in_home.unlink()
    assert outcome.returncode == 0 and "FileNotFoundError" in outcome.stderr
    assert secret not in outcome.stderr


def test_environment_is_empty(sandbox, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("STEPFLASH_TEST_TOKEN", secret)
    outcome = sandbox.run("import json, os, sys; print(json.dumps(dict(os.environ)), file=sys.stderr)")
    assert outcome.returncode == 0 and secret not in outcome.stderr
    assert set(json.loads(outcome.stderr)) <= {"PWD", "LC_CTYPE"}  # what bwrap and Python set themselves


@pytest.mark.parametrize("ending", ["exits", "times out"])
def test_no_process_outlives_the_program(sandbox, ending):
    marker = f"stepflash-test-{uuid.uuid4().hex}"
    attack = f"""
import os, subprocess
subprocess.Popen([{marker!r}, "60"], executable={SLEEP!r}, start_new_session=True)
if os.fork() == 0:  # a daemon: double fork, new session
    os.setsid()
    if os.fork() == 0:
        os.execv({SLEEP!r}, [{marker!r}, "60"])
    os._exit(0)
while {ending == "times out"}:
    pass
"""
    try:
        passed, detail = run_program(attack, sandbox, Limits(seconds=2))
        assert (passed, detail) == ((False, "timeout") if ending == "times out" else (True, "passed"))
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_fork_loop_is_bounded_and_reaped(sandbox):
    marker = f"stepflash-test-{uuid.uuid4().hex}"
    attack = f"""
import os, sys
started = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            os.execv({SLEEP!r}, [{marker!r}, "60"])
    except OSError:
        break
    started += 1
print(started, file=sys.stderr)
"""
    try:
        outcome = sandbox.run(attack, Limits(processes=16))
        assert outcome.returncode == 0 and 0 < int(outcome.stderr) < 16
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


# `stepflash eval --task humaneval` against an endpoint that answers with scripted completions

ITEMS = [  # (HumanEval item, the endpoint's completion, passes)
    ({"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
      "test": "def check(f):\n    assert f(2, 3) == 5\n"}, "    return a + b\n", True),
    ({"task_id": "t/1", "prompt": "import math\n\n\ndef hyp(a, b):\n", "entry_point": "hyp",
      "test": "def check(f):\n    assert f(3, 4) == 5.0\n"}, "    return math.hypot(a, b)\n\n\ndef extra():", True),
    ({"task_id": "t/2", "prompt": "def neg(x):\n", "entry_point": "neg",
      "test": "def check(f):\n    assert f(1) == -1\n"}, "    return x\n", False),
]


class ScriptedCompletions(BaseHTTPRequestHandler):
    """/v1/completions streaming the completion scripted for each prompt; counts requests."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests += 1
        events = [{"choices": [{"index": 0, "text": self.server.answers[body["prompt"]]}]},
                  {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}]
        payload = ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedCompletions)
    server.answers, server.requests = {row["prompt"]: answer for row, answer, _ in ITEMS}, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def run_humaneval(server: ThreadingHTTPServer, tmp_path: Path, *flags: str) -> tuple[int, dict | None]:
    data = tmp_path / "humaneval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row, _, _ in ITEMS))
    out = tmp_path / "results"
    code = main(["eval", "--base-url", f"http://127.0.0.1:{server.server_port}", "--model", "m", "--task",
                 "humaneval", "--data", str(data), "--output-dir", str(out), *flags])
    results = list(out.glob("eval-*.json"))
    return code, json.loads(results[0].read_text()) if results else None


def test_humaneval_scores_in_the_sandbox(sandbox, endpoint, tmp_path):
    code, result = run_humaneval(endpoint, tmp_path)
    assert code == 0 and result["sandbox"] == sandbox.name and result["warnings"] == []
    assert [r["correct"] for r in result["results"]] == [passes for _, _, passes in ITEMS]


def test_code_tasks_are_refused_without_a_sandbox(without_bwrap, endpoint, tmp_path, capsys):
    code, result = run_humaneval(endpoint, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and result is None and endpoint.requests == 0
    assert "bubblewrap (bwrap) is not installed" in err and "apt-get install bubblewrap" in err
    assert "--unsafe-no-sandbox" in err

    fake = without_bwrap / "bwrap"  # installed, but the kernel refuses its namespaces
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'bubblewrap 0.0' && exit 0\n"
                    "echo 'bwrap: No permissions to creating new namespace' >&2; exit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match=r"could not make one here \(bwrap: No permissions"):
        bubblewrap()


def test_unsafe_no_sandbox_runs_code_and_warns(without_bwrap, endpoint, tmp_path, capsys):
    code, result = run_humaneval(endpoint, tmp_path, "--unsafe-no-sandbox")
    assert code == 0 and result["sandbox"] == UNCONFINED.name
    assert [r["correct"] for r in result["results"]] == [passes for _, _, passes in ITEMS]
    assert "WITHOUT a sandbox" in capsys.readouterr().err and "WITHOUT a sandbox" in result["warnings"][0]
