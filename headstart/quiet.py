"""TensorFlow's C++ start-up lines ("All log messages before absl::InitializeLog() ...",
"oneDNN custom operations are on ...") are written straight to file descriptor 2 while
TensorFlow loads, whatever TF_CPP_MIN_LOG_LEVEL says. Commands hide them unless --verbose by
capturing descriptor 2 while TensorFlow starts and passing every other line on.

TensorFlow starts only when something needs it: `start_tensorflow()` is called by each step that
runs it (tasks.Step.run) and by `headstart predict` once its checks pass, so a run whose stale
steps need none (prepare, plots) never pays the ~7 s of CPU it costs to load."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from headstart.errors import UserError

STARTUP_NOISE = re.compile(
    r"absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU"  # LiteRT, when a model loads
)


# the one switch (start-up lines, tracebacks): `headstart --verbose` sets it, so the processes a
# command starts (Dask workers, `headstart step` under `dvc repro`) inherit it; set it yourself to
# see everything from `dvc repro`
VERBOSE_ENV = "HEADSTART_VERBOSE"


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def start_tensorflow() -> None:
    """Load TensorFlow now (if not yet), without its start-up lines unless verbose (then it
    loads where it is first imported, and they show)."""
    if not verbose():
        start_tensorflow_quietly()


def start_tensorflow_quietly() -> None:
    """Import TensorFlow and run one op (the second burst of start-up lines comes with the first
    op), with its start-up lines dropped; anything else written meanwhile is kept."""
    if "tensorflow" in sys.modules:
        return
    with native_noise_dropped():
        import tensorflow as tf

        tf.constant(0.0) + 1.0


@contextlib.contextmanager
def native_noise_dropped() -> Iterator[None]:
    """Capture file descriptor 2 (what C++ code writes past Python's sys.stderr) for the block and
    pass every line on except the known noise (STARTUP_NOISE). Not while verbose: then all of it
    shows."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not STARTUP_NOISE.search(line):
                    sys.stderr.write(line)


class _HideUserErrors(logging.Filter):
    """Drop Prefect's log records about a run that failed on a UserError: the CLI prints that
    error as one line. Keyed on the exception's type: the record carrying the exception marks its
    Prefect run(s), and that run's later error lines without one ("Finished in state Failed")
    are dropped too. Real bugs pass."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_runs: set[str] = set()  # Prefect run ids that failed on a UserError

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        runs = {
            str(getattr(record, key))
            for key in ("flow_run_id", "task_run_id")
            if getattr(record, key, None)
        }
        error = record.exc_info[1] if record.exc_info else None
        while error is not None and not isinstance(error, UserError):
            error = error.__cause__ or error.__context__
        if error is not None:
            self.failed_runs |= runs
            return False
        return (
            bool(record.exc_info) or record.levelno < logging.ERROR or not runs & self.failed_runs
        )


_HIDE = _HideUserErrors()


def hide_user_error_tracebacks() -> None:
    """On every handler now configured: drop Prefect's records about a UserError (the caller
    prints or logs it as one line); none with --verbose."""
    if verbose():
        return
    hide = _HIDE
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if hide not in handler.filters:
                handler.addFilter(hide)


class _OnlyErrorsFromTensorFlow(logging.Filter):
    """TensorFlow's warnings (retracing, ~600 characters each) are not the user's business."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.name.startswith(("tensorflow", "absl"))


def console_to_file(log_file: Path) -> None:
    """From now on in this process (unless verbose): the console handlers Prefect, DVC and
    TensorFlow log through show warnings and errors only, and every record from INFO up also goes
    to `log_file` (written afresh), the place to look when a run goes wrong."""
    if verbose():
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)),
    ]
    tensorflow = _OnlyErrorsFromTensorFlow()
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is not logging.FileHandler and isinstance(
                handler, logging.StreamHandler
            ):
                handler.setLevel(max(handler.level, logging.WARNING))
                handler.addFilter(tensorflow)
        if logger is logging.getLogger() or (logger.handlers and not logger.propagate):
            logger.addHandler(to_file)
