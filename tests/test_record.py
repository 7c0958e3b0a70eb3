"""benchmarks/record.py: every benchmark's JSON record, and a day's later runs beside the first."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from record import write_record  # noqa: E402


def test_a_second_run_the_same_day_keeps_the_first_record(tmp_path):
    paths = [write_record("bench", "bench-tiny", {"run": run}, tmp_path) for run in range(3)]
    assert len(set(paths)) == 3 and sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]
    record = json.loads(paths[0].read_text())
    assert record["benchmark"] == "bench" and paths[0].name == f"bench-tiny-{record['date']}.json"
    assert {"commit", "device", "torch", "threads", "command"} <= set(record)
