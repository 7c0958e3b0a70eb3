"""Progress on stderr while a benchmark or eval runs: a rich bar when rich is installed, else a counter."""

import sys


class Progress:
    def __init__(self, name: str, total: int | None, enabled: bool = True) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.done = self.failed = 0
        self._bar = None
        if enabled:
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                )
                from rich.progress import Progress as Bar

                self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
                self._task = self._bar.add_task(name, total=total)
                self._bar.start()
            except ImportError:
                self._bar = None

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if not self.enabled:
            return
        label = f"{self.name} ({self.failed} failed)" if self.failed else self.name
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=label)
        else:
            of = f"/{self.total}" if self.total else ""
            print(f"\r{label}: {self.done}{of} requests done", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self.done:
            print(file=sys.stderr)
