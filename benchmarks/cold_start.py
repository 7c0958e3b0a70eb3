"""Cold start: seconds from launch to a ready `LLM()` on the CPU, with inductor's cache empty (a new
directory) or as given, and each compile of the start's warm-up (LLMEngine._compile_steps: every
step kind the engine compiles, before it takes requests): each call of a compiled step or of the
compiled verify that took over a second (a compile; on the bundled model a step takes milliseconds).

    python benchmarks/cold_start.py [--model DIR] [--cache DIR] [--out DIR]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

LAUNCHED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a hub-format directory (default: the bundled model)")
    parser.add_argument("--cache", help="inductor's cache directory (default: a new, empty one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache or tempfile.mkdtemp(prefix="stepflash-inductor-")

    from stepflash import LLM  # torch and inductor read the cache directory from here on
    from stepflash.engine.runner import Compiled

    compiles, call = [], Compiled.__call__

    def timed(self: Compiled, *inputs):
        start = time.perf_counter()
        out = call(self, *inputs)
        took = time.perf_counter() - start
        if took > 1.0:
            shapes = [list(t.shape) for t in inputs if hasattr(t, "shape")][:2]
            compiles.append({"function": self.fn.__name__, "s": round(took, 1), "first_shapes": shapes})
            print(f"{self.fn.__name__:<20} {took:6.1f} s  {shapes}", flush=True)
        return out

    Compiled.__call__ = timed
    start = time.perf_counter()
    LLM(**({"model": args.model} if args.model else {}))
    ready, llm_s = time.perf_counter() - LAUNCHED, time.perf_counter() - start
    print(f"LLM() {llm_s:.1f} s, ready {ready:.1f} s after launch; {len(compiles)} compiles, "
          f"{sum(c['s'] for c in compiles):.1f} s", flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from record import write_record

    write_record("cold_start", "cold_start-tiny" if not args.model else "cold_start",
                 {"cache": "given" if args.cache else "empty", "llm_s": round(llm_s, 1), "ready_s": round(ready, 1),
                  "compiles": compiles}, args.out)


if __name__ == "__main__":
    main()
