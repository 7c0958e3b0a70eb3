"""What every benchmark's JSON holds besides its numbers (when, which commit, on what, which torch,
the command), and where it goes: OUT_DIR/STEM-DATE.json, or STEM-DATE-N.json for the day's Nth run (an
earlier record is never overwritten)."""

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def write_record(benchmark: str, stem: str, fields: dict, out_dir: Path) -> Path:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    record = {"benchmark": benchmark, "date": datetime.date.today().isoformat(), "commit": commit, "device": device,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "command": " ".join(sys.argv), **fields}
    out_dir.mkdir(parents=True, exist_ok=True)
    path, n = out_dir / f"{stem}-{record['date']}.json", 2
    while path.exists():
        path, n = out_dir / f"{stem}-{record['date']}-{n}.json", n + 1
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path
