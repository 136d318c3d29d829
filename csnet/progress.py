"""Progress display: Rich bars for epochs and batches on a terminal, one line per epoch everywhere."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    """Silent reporter; the interface the training loop talks to."""

    def start(self, epochs: int, steps_per_epoch: int) -> None: ...
    def step(self) -> None: ...
    def epoch(self, line: str) -> None: ...
    def close(self) -> None: ...


class RichReporter(Reporter):
    """Bars only when stdout is a terminal and not ``quiet``; the per-epoch line unless ``quiet``."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress = None

    def start(self, epochs: int, steps_per_epoch: int) -> None:
        if self.quiet or not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self.progress.start()
        self._epochs = self.progress.add_task("epochs", total=epochs)
        self._steps = self.progress.add_task("batches", total=steps_per_epoch)

    def step(self) -> None:
        if self.progress is not None:
            self.progress.advance(self._steps)

    def epoch(self, line: str) -> None:
        if self.progress is not None:
            self.progress.advance(self._epochs)
            self.progress.reset(self._steps)
        if not self.quiet:
            self.console.print(line, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
