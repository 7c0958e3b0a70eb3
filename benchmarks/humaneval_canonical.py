"""HumanEval's canonical solutions through the eval scorer, unconfined and in the bubblewrap sandbox.

A check that the sandbox takes nothing a correct program needs: every canonical solution should pass
in both, and the script prints the pass counts and the wall time of each.

    python benchmarks/humaneval_canonical.py [--data ../shared/data/humaneval.jsonl] [--limit N]
"""

import argparse
import json
import time
from pathlib import Path

from stepflash.bench.evals import load_items, score
from stepflash.bench.sandbox import UNCONFINED, bubblewrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared/data/humaneval.jsonl")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    items = load_items("humaneval", args.data, args.limit)
    solutions = {row["task_id"]: row["canonical_solution"]
                 for row in map(json.loads, args.data.read_text(encoding="utf-8").splitlines()) if row}
    for name, sandbox in (("unconfined", UNCONFINED), ("bubblewrap", bubblewrap())):
        start = time.perf_counter()
        failed = [item.item_id for item in items if not score(item, solutions[item.item_id], sandbox)[0]]
        print(f"{name}: {len(items) - len(failed)}/{len(items)} passed in {time.perf_counter() - start:.1f} s"
              + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
