#!/usr/bin/env bash
# Every GPU check (issue 13) in one device call of about 8 minutes (TOTAL); what is worth keeping lands in
# $OUT: log.txt (all output), tiles.json (gpu_tiles.py), decode-fp8.json, decode-int4.json, decode-bf16.json
# (gpu_decode.py), e2e.json (gpu_e2e.py) and summary.md, the table printed last. Steps, each under `timeout` (a failure
# is recorded and the next step runs; exit status 1 if any step was not ok):
#   tests-kernels  tests/test_kernels.py tests/test_fp8.py compiled on CUDA, bf16 cases included
#   tests-graphs   tests/test_graphs.py (decode and verify steps captured in CUDA graphs)
#   tests-engine   tests/test_engine.py tests/test_speculative.py tests/test_structured.py (grammar
#                  masks applied on the device, under MTP) with every `LLM` a test builds on
#                  kernels="triton" + CUDA graphs (STEPFLASH_TEST_KERNELS=triton, see tests/conftest.py)
#   tiles          benchmarks/gpu_tiles.py: the routed-expert kernels alone at the real shape, each weight
#                  format, 1/8/16 tokens, and the FP8 linear at 1/4 rows, three tile sizes each
#                  (tiles.json): what their default tiles should be
#   decode-fp8, decode-int4, decode-bf16   benchmarks/gpu_decode.py at the real shape: 4 layers
#                  extrapolated to 45, except int4 with all 45 layers where the card holds them
#                  (>= 130 GiB: H200); batch 1/8/32 x context 1K/32K/128K, verify steps k = 1..3,
#                  achieved GB/s vs measured copy GB/s; projection with tau 3.5 (MTP-3, bundled model);
#                  first, the time per kernel of a batch-1 step (torch.profiler)
#   e2e            benchmarks/gpu_e2e.py: LLM at the real layer shapes with kernels + graphs + MTP-3,
#                  greedy tokens equal to kernels="torch" (float32; bfloat16 agreement reported)
#
# The device machine is offline (Python 3.12, its own torch/triton, transformers 5.17): run
# benchmarks/gpu_wheels.sh here first (fills the git-ignored .whl/), then make this call:
#   run(command="STEPFLASH_COMMIT=<git rev-parse --short HEAD, run here> bash benchmarks/gpu_check.sh",
#       carry=[".whl"], timeout_s=540, kind="nvidia-h200")
# (the tree travels without .git, hence the commit by hand; 540 s leaves a second call room to run;
# the H200 holds all 45 int4 layers, which the single-stream projection wants: where none is lent,
# leave kind out and int4 is measured on 4 layers and extrapolated, like fp8 and bf16).
# Knobs: STEPS (the steps to run, by name), T_TESTS_KERNELS, T_TESTS_GRAPHS, T_TESTS_ENGINE, T_DECODE_FP8,
# T_TILES, T_DECODE_INT4, T_DECODE_BF16, T_E2E (each step's seconds), TOTAL (the whole script's, 500): a second
# call can rerun a part with more time, e.g. STEPS="tests-engine e2e" T_TESTS_ENGINE=300.
# Dry run on a CPU (tests/test_gpu_check.py): GPU_CHECK_DRY=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh
# (Triton's interpreter, tiny shapes, a few tests per group).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DRY=${GPU_CHECK_DRY:-0}
STEPS=${STEPS:-tests-kernels tests-graphs tests-engine tiles decode-fp8 decode-int4 decode-bf16 e2e}
TOTAL=${TOTAL:-500}  # seconds for the whole script: a step never runs past it
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export STEPFLASH_COMMIT=${STEPFLASH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
say() { echo "$*" | tee -a "$LOG"; }

# step NAME BUDGET COMMAND...: runs COMMAND under timeout (BUDGET seconds, less if TOTAL is near)
step() {
    local name=$1 budget=$2 rc status t0=$SECONDS left
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    left=$((TOTAL - (SECONDS - START)))
    ((budget > left)) && budget=$left
    if ((budget < 10)); then
        printf '%s\tno time left\t0\n' "$name" >>"$WORK/steps.tsv"
        return 0
    fi
    say "=== $name (at most ${budget}s): $*"
    timeout -k 10 "$budget" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in 0) status=ok ;; 124 | 137) status="timed out" ;; *) status="failed (exit $rc)" ;; esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
    say "=== $name: $status after $((SECONDS - t0))s"
}

say "=== setup: commit $STEPFLASH_COMMIT, $(date -u +%FT%TZ), dry run: $DRY"
if compgen -G ".whl/*.whl" >/dev/null; then  # transformers >= 5.23 for the oracle tests, llguidance, jsonschema
    PIP_ROOT_USER_ACTION=ignore timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl 2>&1 | tee -a "$LOG" &&
        export PYTHONPATH=$WORK/site:$PYTHONPATH
else
    say "no .whl/ (benchmarks/gpu_wheels.sh): the image's own transformers serves the oracle tests"
fi
python3 -c 'import sys, torch, triton, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv 2>&1 | tee -a "$LOG"

# without the project's addopts (`-n logical`: the image may lack xdist, and a dry run inside a test
# worker would start workers of its own)
PYTEST=(python3 -m pytest -o addopts= -v -p no:cacheprovider --tb=short)
# 8 pytest-xdist workers where the image has it (the device's does): the tests are bound by Triton's
# compiler on the CPU (~3-16 s a test, 16 cores); tests/conftest.py gives each worker its share of
# the card's memory
[[ $DRY != 1 ]] && python3 -c "import xdist" 2>/dev/null && PYTEST+=(-n 8 -p no:benchmark)
DECODE=(python3 benchmarks/gpu_decode.py --iters 10 --profile --tau 3.5 --tau-source "tau measured on the bundled model (MTP-3)")
E2E=(python3 benchmarks/gpu_e2e.py)
TILES=(python3 benchmarks/gpu_tiles.py)
INT4_LAYERS=4
if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1 TORCH_COMPILE_DISABLE=1  # no torch.compile of the CPU steps (minutes) in a dry run
    K_KERNELS=(-k "add_rmsnorm and 1-64 or kernel_decodes_every_finite_byte or expert_blocks_cover and 1-2-8")
    K_GRAPHS=(-k graph_buckets_cover_every_row_count)
    K_ENGINE=(-k default_mtp_is_what_the_checkpoint_holds)
    DECODE+=(--device cpu --tiny --layers 2 --batch 1 --context 16 --mtp 3 --iters 1)
    INT4_LAYERS=2
    E2E+=(--device cpu --tiny --dtypes float32)
    TILES+=(--device cpu --tiny --iters 1)
else
    K_KERNELS=() K_GRAPHS=() K_ENGINE=()
    gib=$(python3 -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)' || echo 0)
    ((gib >= 130)) && INT4_LAYERS=45  # int4 experts: ~116 GB for all 45 layers
fi

step tests-kernels "${T_TESTS_KERNELS:-70}" "${PYTEST[@]}" tests/test_kernels.py tests/test_fp8.py "${K_KERNELS[@]}"
step tests-graphs "${T_TESTS_GRAPHS:-25}" "${PYTEST[@]}" tests/test_graphs.py "${K_GRAPHS[@]}"
step tests-engine "${T_TESTS_ENGINE:-110}" env STEPFLASH_TEST_KERNELS=triton "${PYTEST[@]}" tests/test_engine.py \
    tests/test_speculative.py tests/test_structured.py "${K_ENGINE[@]}"
step tiles "${T_TILES:-55}" "${TILES[@]}" --out "$OUT/tiles.json"
step decode-fp8 "${T_DECODE_FP8:-50}" "${DECODE[@]}" --weights fp8 --out "$OUT/decode-fp8.json"
step decode-int4 "${T_DECODE_INT4:-70}" "${DECODE[@]}" --weights int4 --layers "$INT4_LAYERS" \
    --out "$OUT/decode-int4.json"
step decode-bf16 "${T_DECODE_BF16:-30}" "${DECODE[@]}" --weights bf16 --out "$OUT/decode-bf16.json"
step e2e "${T_E2E:-90}" "${E2E[@]}" --out "$OUT/e2e.json"

# The summary: steps, test counts (read off the log, so a step stopped at its limit still counts),
# the fastest tiles, batch-1..32 decode figures and the projection, the end-to-end check.
python3 - "$OUT" "$WORK/steps.tsv" <<'EOF' 2>&1 | tee "$OUT/summary.md"
import datetime, json, os, re, sys
from pathlib import Path

out, steps = Path(sys.argv[1]), Path(sys.argv[2])
rows = [line.split("\t") for line in steps.read_text().splitlines()] if steps.exists() else []
sections = re.split(r"^=== (\S+) \(at most.*$", (out / "log.txt").read_text(), flags=re.M)
logs = dict(zip(sections[1::2], sections[2::2]))


def load(name: str) -> dict | None:
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def best_ms(r: dict | None) -> float | None:
    return r and min(t for t in (r["eager_ms"], r["graph_ms"]) if t is not None)


decode = {w: load(f"decode-{w}.json") for w in ("fp8", "int4", "bf16")}
e2e = load("e2e.json")
head = next((d for d in [*decode.values(), e2e] if d), {})
bw = next((d["copy_gb_per_s"] for d in decode.values() if d and d.get("copy_gb_per_s")), None)
print(f"# gpu_check: {head.get('device', '?')}, {datetime.date.today()}, commit {os.environ['STEPFLASH_COMMIT']}; "
      f"copy bandwidth {num(bw, 0)} GB/s\n")
print("| step | status | s | detail |\n| --- | --- | --- | --- |")
failed_tests = []
for name, status, seconds in rows:
    detail, log = "", logs.get(name, "")
    if name.startswith("tests-"):
        # `tests/x.py::t PASSED [ 1%]` in one process, `[gw3] [  1%] PASSED tests/x.py::t` under xdist
        results = [(a or d, b or c) for a, b, c, d in re.findall(
            r"^(?:(tests/\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
            r"|\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+))", log, re.M)]
        counts = {r: sum(1 for _, x in results if x == r) for r in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        parts = [f"{n} {r.lower()}" for r, n in counts.items() if n]
        failed_tests += [t for t, r in results if r in ("FAILED", "ERROR")]
        running = re.findall(r"^(tests/\S+::\S+) *(?:=== .*)?$", log, re.M)  # no result: cut off
        if status == "timed out" and running:
            parts.append(f"running at the limit: {running[-1]}")
        detail = ", ".join(parts)
    elif name.startswith("decode-") and (d := decode[name.removeprefix("decode-")]):
        err = d.get("kernel_vs_torch_max_rel_diff")
        detail = (f"{d['layers']} layers, {len(d['results'])} points, {len(d.get('errors', []))} errors, "
                  f"kernels vs torch {err and f'{err:.1e}'}")
        if p := next((r for r in d["results"] if r["batch"] == 1 and r["mtp_k"] == 0), None):
            detail += f"; batch 1, context {p['context']}: roofline_fraction {num(p['roofline_fraction'])}"
    elif name == "tiles" and (m := load("tiles.json")):
        best = {}
        for r in m["results"]:  # the fastest tiles per kernel, format or shape, and rows
            key = (r["weights"], r["tokens"]) if r["kernel"] == "fused_moe" else (f"fp8 {r['n']}x{r['k']}", r["rows"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
        detail = "; ".join(f"{w} x{t}: " + (f"{r['rows']}x{r['inner']}/{r['grouped']}" if r["kernel"] == "fused_moe"
                                            else f"block_n {r['block_n']}") +
                           f" {num(r['ms'] * 1e3, 0)} us ({num(r['roofline_fraction'])} of copy)"
                           for (w, t), r in best.items())
    elif name == "e2e" and e2e:
        detail = "; ".join(f"{dt}: tokens equal {c['tokens_equal']}{'' if c['required'] else ' (not required)'}, "
                           f"kernels + graphs {num(c['speedup'])}x torch" for dt, c in e2e["checks"].items())
    print(f"| {name} | {status} | {seconds} | {detail} |")
if failed_tests:
    print("\nfailed tests:\n" + "\n".join(f"- {t}" for t in failed_tests))
print("\n| weights | layers | batch | context | k=0 ms | GB/s | roofline | k=1 ms | k=2 ms | k=3 ms | 45-layer tok/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for w, d in decode.items():
    by = {(r["batch"], r["context"], r["mtp_k"]): r for r in (d or {}).get("results", [])}
    for (b, c, k), r in by.items():
        if k == 0:
            verify = " | ".join(num(best_ms(by.get((b, c, j)))) for j in (1, 2, 3))
            print(f"| {w} | {d['layers']} | {b} | {c} | {num(best_ms(r))} | {num(r['gb_per_s'], 0)} | "
                  f"{num(r['roofline_fraction'])} | {verify} | {num(r['tokens_per_s_45_layers'], 0)} |")
for w, d in decode.items():
    for point, kernels in ((d or {}).get("profile") or {}).items():
        print(f"\nkernels ({w}, {d['layers']} layers, {point}): " + "; ".join(
            f"{k['kernel'][:40]} {num(k['us_per_step'], 0)} us x{num(k['calls_per_step'], 0)}" for k in kernels[:6]))
for w, d in decode.items():
    if d and (p := d.get("projection")):
        print(f"\nprojection ({w}): {num(p['tokens_per_s'], 0)} tokens/s single stream with MTP-3, tau {p['tau']}: "
              f"{p['note']}")
if e2e:
    print(f"\ne2e, {e2e['label']}:")
    for r in e2e["runs"]:
        print(f"- {r['dtype']} kernels={r['kernels']}: " + (r.get("error") or f"cuda_graphs={r['cuda_graphs']} "
              f"mtp=3, {num(r['tokens_per_s'], 1)} tokens/s, tau {num(r['tau'])}"))
EOF
failed=$(awk -F'\t' '$2 != "ok"' "$WORK/steps.tsv" 2>/dev/null | wc -l)
echo "gpu_check: $failed step(s) not ok, $((SECONDS - START))s" | tee -a "$LOG"
exit "$((failed > 0 ? 1 : 0))"
