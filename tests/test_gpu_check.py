"""benchmarks/gpu_check.sh, the one device call that runs every GPU check, dry-run end to end on the
CPU (Triton's interpreter, tiny shapes, a few tests per group), so that it cannot rot while no GPU is
lent: every step runs, writes its results under $OUT and the summary reads them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["tests-kernels", "tests-graphs", "tests-engine", "tiles", "decode-fp8", "decode-int4", "decode-bf16",
         "e2e"]


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("STEPS", "TOTAL", "STEPFLASH_TEST_KERNELS")}
    env.update(GPU_CHECK_DRY="1", OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "decode-bf16.json", "decode-fp8.json", "decode-int4.json", "e2e.json", "log.txt", "summary.md", "tiles.json"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.strip() in proc.stdout  # printed, last but one line (the count of steps not ok)
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in summary.splitlines() if line.startswith("| ")}
    for step in STEPS:
        assert lines[step].startswith(f"| {step} | ok |"), lines[step]
    for step in STEPS[:3]:  # tests ran, and none failed
        assert " passed" in lines[step] and "failed" not in lines[step] and "error" not in lines[step]
    for weights in ("fp8", "int4", "bf16"):
        record = json.loads((tmp_path / f"decode-{weights}.json").read_text())
        assert [r["mtp_k"] for r in record["results"]] == [0, 3]
        assert all("roofline_fraction" in r for r in record["results"])
        assert record["projection"]["tau"] == 3.5
    tiles = json.loads((tmp_path / "tiles.json").read_text())
    assert {(r["weights"], r["tokens"]) for r in tiles["results"] if r["kernel"] == "fused_moe"} == {
        (w, t) for w in ("int4", "fp8", "bf16") for t in (1, 16)}
    assert [r["rows"] for r in tiles["results"] if r["kernel"] == "fp8_linear"] == [1]
    assert " us (" in lines["tiles"] and "block_n 16" in lines["tiles"]
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["checks"]["float32"]["tokens_equal"]
    runs = [(r["kernels"], r["cuda_graphs"], r["mtp"]) for r in e2e["runs"]]
    assert runs == [("torch", "off", 3), ("triton", "on", 3)]


def test_a_moe_layer_stays_within_its_kernel_launches():
    """benchmarks/layer_launches.py runs, and a MoE layer's decode step on the kernel path launches at
    most 16 kernels (each costs a few us a layer on a GPU: a new cast or an unfused op fails here)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layer_launches.py")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = int(re.search(r"^(\d+) launches in one MoE layer", proc.stdout, re.MULTILINE).group(1))
    assert 10 <= total <= 16, proc.stdout
