"""The bundled model served with mtp=0 and with mtp=3, same workloads: speed and accuracy side by side.

For each setting a `stepflash serve` process is started; then `stepflash bench` (prompts cut from
the standard library, concurrency 1 and 4, fixed output length) and `stepflash eval` on two tasks:
next-line completion of held-out standard-library code (a JSONL this script writes to a temporary
directory: prompt = 30 lines of a held-out file, answer = the next non-blank line of at most 60
characters, scorer "prefix")
(and, easier, only the indentation and first word of that line) and, when --humaneval FILE is
given, the first N HumanEval problems. Results and the report's charts
go to benchmarks/results/serve_compare-<date>/.

    python benchmarks/serve_compare.py [--humaneval ../shared/data/humaneval.jsonl] [--limit 40]
"""

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

from stepflash.cli import main as cli
from stepflash.models import default_model_dir
from stepflash.train.tokenizer import corpus_files
from stepflash.train.trainer import split_files


def next_line_tasks(path: Path, count: int, context_lines: int = 30, first_word: bool = False) -> None:
    """JSONL of next-line completions of held-out files (the whole line, or only its indentation and
    first word: an easier task that still separates models)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    _, heldout = split_files(corpus_files([stdlib], (".py",), ("site-packages",)), 0.05)
    rows = []
    for file in heldout:
        lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
        for start in range(40, len(lines) - context_lines - 1, 97):
            line = lines[start + context_lines].rstrip("\n")
            if line.strip() and len(line) <= 60 and len(rows) < count:
                # the prompt stops before the newline: "\n" + indentation is usually one token
                answer = re.match(r"\s*(\w+|\S)", line).group(0) if first_word else line
                rows.append({"id": f"{file.name}:{start + context_lines + 1}",
                             "prompt": "".join(lines[start:start + context_lines]).rstrip("\n"),
                             "answer": "\n" + answer, "scorer": "prefix"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def serve(mtp: int, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "stepflash.cli", "serve", "--model", str(default_model_dir()),
                             "--port", str(port), "--served-model-name", "bundled", "--mtp", str(mtp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    for _ in range(1500):  # the server compiles its steps first: a minute or two
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--humaneval", type=Path, help="HumanEval JSONL (not shipped with the project)")
    ap.add_argument("--limit", type=int, default=40, help="items per eval task")
    ap.add_argument("--requests", type=int, default=8, help="bench requests per point")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    f"serve_compare-{datetime.date.today().isoformat()}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {"next-line": Path(tmp) / "next_line.jsonl", "next-word": Path(tmp) / "next_word.jsonl"}
        next_line_tasks(tasks["next-line"], args.limit)
        next_line_tasks(tasks["next-word"], args.limit, first_word=True)
        for mtp in (0, 3):
            port = free_port()
            proc = serve(mtp, port)
            try:
                common = ["--base-url", f"http://127.0.0.1:{port}", "--model", "bundled", "--label", f"mtp={mtp}",
                          "--output-dir", str(args.out), "--completions"]
                cli(["bench", *common, "--input-len", "400", "--output-len", "128", "--num-requests",
                     str(args.requests), "--concurrency", "1,4"])
                for name, path in tasks.items():
                    cli(["eval", *common, "--task", "jsonl", "--data", str(path), "--max-tokens", "24",
                         "--label", f"mtp={mtp} {name}"])
                if args.humaneval:
                    cli(["eval", *common, "--task", "humaneval", "--data", str(args.humaneval), "--limit",
                         str(args.limit), "--max-tokens", "192"])
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    cli(["report", *map(str, sorted(args.out.glob("*.json"))), "--out", str(args.out)])


if __name__ == "__main__":
    main()
