"""`stepflash report`: terminal tables and PNG charts from `stepflash bench` / `stepflash eval` JSON.

Charts: output tokens/s against concurrency (one line per label), TTFT and TPOT percentiles per
bench point, and intelligence against speed (accuracy vs median per-request output tokens/s, one
point per label), the chart of the public leaderboards. A result's label is its `label` field
(`--label` when it was run), else the endpoint's model name.
"""

import json
from collections import defaultdict
from pathlib import Path


def label(result: dict) -> str:
    return result.get("label") or result.get("endpoint", {}).get("model", "?")


def load_results(paths: list[Path]) -> list[dict]:
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a result file ({e})") from None
        if result.get("kind") not in ("bench", "eval"):
            raise ValueError(f"{path}: not a stepflash bench or eval result")
        results.append(result)
    return results


def _median(summary: dict | None) -> float:
    return summary["median"] if summary else float("nan")


def bench_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["kind"] != "bench" or not r.get("completed"):
            continue
        w, spec = r["workload"], r.get("spec_decode") or {}
        rows.append([label(r), w["name"], str(w["concurrency"]), str(w["input_len"]), str(r["completed"]),
                     str(r["failed"]), f"{r['output_throughput']:.1f}", f"{_median(r['output_speed_tok_s']):.1f}",
                     f"{1e3 * _median(r['ttft_s']):.0f}", f"{1e3 * _median(r['tpot_s']):.1f}",
                     f"{spec['tau']:.2f}" if spec.get("tau") else "-"])
    return rows


def eval_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["kind"] != "eval":
            continue
        speed = r["speed"].get("output_speed_tok_s") if r["speed"].get("completed") else None
        rows.append([label(r), r["task"], f"{100 * r['accuracy']:.1f}%", f"{r['correct']}/{r['items']}",
                     f"{_median(speed):.1f}", f"{r['output_tokens_per_task'] or 0:.0f}",
                     f"{r['seconds_per_task'] or 0:.2f}"])
    return rows


BENCH_HEADER = ["label", "workload", "conc.", "input", "ok", "failed", "out tok/s", "tok/s/req", "TTFT ms",
                "TPOT ms", "MTP tau"]
EVAL_HEADER = ["label", "task", "accuracy", "correct", "tok/s/req", "tokens/task", "s/task"]


def print_tables(results: list[dict]) -> None:
    for title, header, rows in (("bench", BENCH_HEADER, bench_rows(results)), ("eval", EVAL_HEADER, eval_rows(results))):
        if not rows:
            continue
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            for name in header:
                table.add_column(name, justify="left" if name in ("label", "workload", "task") else "right")
            for row in rows:
                table.add_row(*row)
            Console().print(table)
        except ImportError:  # rich is optional
            print(title)
            print(" | ".join(header))
            for row in rows:
                print(" | ".join(row))


def write_charts(results: list[dict], out_dir: Path) -> list[Path]:
    """PNG charts for whatever the results hold; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    bench = [r for r in results if r["kind"] == "bench" and r.get("completed")]
    evals = [r for r in results if r["kind"] == "eval" and r["speed"].get("completed")]
    if bench:
        by_label: dict[str, list[dict]] = defaultdict(list)
        for r in bench:
            by_label[label(r)].append(r)
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rs in sorted(by_label.items()):
            rs = sorted(rs, key=lambda r: r["workload"]["concurrency"])
            ax.plot([r["workload"]["concurrency"] for r in rs], [r["output_throughput"] for r in rs], "o-", label=name)
        ax.set(xlabel="concurrent requests", ylabel="output tokens/s (all requests)", title="Throughput")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        names = [f"{label(r)}\nc={r['workload']['concurrency']}" for r in bench]
        for ax, key, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
            for i, pct in enumerate(("median", "p90", "p99")):
                values = [1e3 * (r[key] or {}).get(pct, float("nan")) for r in bench]
                ax.bar([x + 0.27 * i for x in range(len(bench))], values, width=0.27, label=pct)
            ax.set_xticks([x + 0.27 for x in range(len(bench))], names, fontsize=7)
            ax.set(ylabel="ms", title=title)
            ax.legend()
        written.append(_save(fig, out_dir / "latency_percentiles.png"))
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in evals:
            speed = _median(r["speed"]["output_speed_tok_s"])
            ax.scatter(speed, 100 * r["accuracy"], s=60)
            ax.annotate(f"{label(r)} ({r['task']})", (speed, 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.set(xlabel="output speed, tokens/s per request (median)", ylabel="accuracy (%)",
               title="Intelligence vs output speed")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "intelligence_vs_speed.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
