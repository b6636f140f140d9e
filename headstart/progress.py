"""Progress of long loops (prepare, feature extraction, predict), shown where the user looks.

- On a terminal (stderr is a TTY, TERM is not `dumb`, HEADSTART_PROGRESS is not `0`): a rich
  progress bar on stderr, erased when the loop ends.
- Otherwise (redirected output, CI, a Prefect run): a plain log line at most every
  `interval` seconds and one at the end, on the step's logger; never one line per item.
- Inside a Prefect flow or task run, when the caller names an `artifact` key: also a Prefect
  progress artifact, updated at most every `ARTIFACT_INTERVAL` seconds and set to 100 at the end.

Prefect is never imported here: a run is detected only when Prefect is already loaded. Each
`advance` costs one addition, one clock read and one comparison; the display work happens at
most a few times a second.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

LOG_INTERVAL = 10.0  # seconds between plain log lines
BAR_INTERVAL = 0.1  # seconds between updates of the rich bar
ARTIFACT_INTERVAL = 5.0  # seconds between updates of the Prefect progress artifact
_OFF = {"0", "false", "no", "off"}


def bars_enabled(stream: TextIO) -> bool:
    """Whether a progress bar may be drawn on `stream`: a terminal, not switched off."""
    if os.environ.get("HEADSTART_PROGRESS", "").strip().lower() in _OFF:
        return False
    if os.environ.get("TERM", "") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run. Never imports Prefect: without it loaded, no run."""
    context = sys.modules.get("prefect.context")
    if context is None:
        return False
    return context.TaskRunContext.get() is not None or context.FlowRunContext.get() is not None


class Tracker:
    """What `progress` yields: call `advance(n)` after each item or batch."""

    def __init__(
        self, total: int, description: str, unit: str, logger: logging.Logger, interval: float
    ) -> None:
        self.total, self.done = max(int(total), 0), 0
        self.description, self.unit, self.logger = description, unit, logger
        self.interval = interval
        self.started = time.monotonic()
        self._bar: Any = None  # rich.progress.Progress, while drawn
        self._task: Any = None
        self._artifact_id: Any = None  # the Prefect artifact's UUID
        self._log_due = self._bar_due = self._artifact_due = float("inf")
        self._due = float("inf")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self._due:
            self._refresh(now)

    def start(self, stream: TextIO, artifact: str | None) -> None:
        prefect_run = in_prefect_run()
        if not prefect_run and bars_enabled(stream):
            self._start_bar(stream)
        else:  # logs reach Prefect's run log inside a run; a bar there would fight its console
            self._log_due = self.started + self.interval
        if prefect_run and artifact:
            self._start_artifact(artifact)
        self._due = min(self._bar_due, self._log_due, self._artifact_due)

    def finish(self, completed: bool) -> None:
        """Take the bar down; after a completed loop, log the final line and set the artifact
        to 100 (a failed loop claims nothing)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            self._bar.stop()
        if not completed:
            return
        if self._log_due != float("inf"):
            self.logger.info("%s in %.1f s", self._line(), time.monotonic() - self.started)
        if self._artifact_id is not None:
            self._update_artifact(100.0)

    # -- the three outputs ------------------------------------------------------------------
    def _start_bar(self, stream: TextIO) -> None:
        from rich import progress as bar
        from rich.console import Console

        self._bar = bar.Progress(
            bar.TextColumn("[bold]{task.description}"),
            bar.BarColumn(),
            bar.MofNCompleteColumn(),
            bar.TextColumn(self.unit),
            bar.TimeElapsedColumn(),
            bar.TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=True),
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._bar.add_task(self.description, total=self.total)
        self._bar.start()
        self._bar_due = self.started + BAR_INTERVAL

    def _start_artifact(self, key: str) -> None:
        try:
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(
                progress=0.0,
                key=key,
                description=f"{self.description}: {self.total} {self.unit}",
                # private: forces the synchronous call inside Prefect's async machinery (pinned
                # prefect==3.x in pyproject; its public sync path returns a coroutine in a flow)
                _sync=True,  # type: ignore[call-arg]
            )
        except Exception as err:  # progress display must never fail the step
            self.logger.warning("%s: no Prefect progress artifact (%s)", self.description, err)
            return
        self._artifact_due = self.started + ARTIFACT_INTERVAL

    def _percent(self) -> float:
        return 100.0 if self.total == 0 else min(100.0, 100.0 * self.done / self.total)

    def _line(self) -> str:
        return f"{self.description}: {self.done}/{self.total} {self.unit} ({self._percent():.0f} %)"

    def _refresh(self, now: float) -> None:
        if now >= self._bar_due:
            self._bar.update(self._task, completed=self.done)
            self._bar_due = now + BAR_INTERVAL
        if now >= self._log_due:
            self.logger.info(self._line())
            self._log_due = now + self.interval
        if now >= self._artifact_due:
            self._update_artifact(self._percent())
            self._artifact_due = now + ARTIFACT_INTERVAL
        self._due = min(self._bar_due, self._log_due, self._artifact_due)

    def _update_artifact(self, percent: float) -> None:
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, progress=percent, _sync=True)  # type: ignore[call-arg]  # see _start_artifact
        except Exception as err:  # progress display must never fail the step
            self.logger.warning(
                "%s: Prefect progress artifact not updated (%s)", self.description, err
            )
            self._artifact_id, self._artifact_due = None, float("inf")


@contextmanager
def progress(
    total: int,
    description: str,
    logger: logging.Logger,
    *,
    unit: str = "items",
    artifact: str | None = None,
    interval: float = LOG_INTERVAL,
    stream: TextIO | None = None,
) -> Iterator[Tracker]:
    """Show the progress of a loop over `total` items; yields a `Tracker` to `advance`.

    `artifact`: a Prefect artifact key (lowercase letters, digits, dashes); a progress artifact
    is kept under it when this runs inside a Prefect flow or task run. `stream`: where a bar is
    drawn (default: stderr, looked up at call time). Results never go to `stream`.
    """
    tracker = Tracker(total, description, unit, logger, interval)
    tracker.start(sys.stderr if stream is None else stream, artifact)
    completed = False
    try:
        yield tracker
        completed = True
    finally:
        tracker.finish(completed)
