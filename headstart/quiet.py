"""TensorFlow's C++ start-up lines ("All log messages before absl::InitializeLog() ...",
"oneDNN custom operations are on ...") are written straight to file descriptor 2 while
TensorFlow loads, whatever TF_CPP_MIN_LOG_LEVEL says. Commands hide them unless --verbose by
capturing descriptor 2 while TensorFlow starts and passing every other line on.

TensorFlow starts only when something needs it: `start_tensorflow()` is called by each step that
runs it (tasks.Step.run) and by `headstart predict` once its checks pass, so a run whose stale
steps need none (prepare, plots) never pays the ~7 s of CPU it costs to load."""

from __future__ import annotations

import os
import re
import sys
import tempfile

STARTUP_NOISE = re.compile(
    r"absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
)


_VERBOSE = {"on": False}  # `headstart --verbose`: the one switch (start-up lines, tracebacks)


def set_verbose(on: bool) -> None:
    _VERBOSE["on"] = on


def verbose() -> bool:
    return _VERBOSE["on"]


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
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.constant(0.0) + 1.0
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not STARTUP_NOISE.search(line):
                    sys.stderr.write(line)
