"""The console filter for Prefect's records: a user's mistake shows as one line, a bug in full."""

from __future__ import annotations

import logging

import pytest

from headstart import quiet
from headstart.errors import ParamsError


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_records_of_a_user_error_are_dropped_and_a_bugs_are_kept():
    from prefect import flow, task

    @task
    def step(kind: str) -> None:
        raise ParamsError("params: head.epochs must be > 0") if kind == "user" else KeyError(kind)

    @flow
    def run(kind: str) -> None:
        step(kind)

    kept = _Kept()
    kept.addFilter(quiet._HideUserErrors())
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(kept)
    try:
        with pytest.raises(ParamsError):
            run("user")
        assert kept.records == []  # the exception records and "Finished in state Failed(...)"
        with pytest.raises(KeyError):
            run("bug")
    finally:
        for logger in loggers:
            logger.removeHandler(kept)
    messages = [record.getMessage() for record in kept.records]
    assert any(record.exc_info for record in kept.records), messages
    assert any(m.startswith("Finished in state Failed") for m in messages), messages
