"""The one exception type for mistakes a user can fix: the CLI prints its message as one line."""

from __future__ import annotations

import errno
import os


class UserError(ValueError):
    """Bad input, settings or environment; the message names the file or setting and the fix."""


class ParamsError(UserError):
    """A bad value in params.yaml (or an override)."""


# the machine's failures (not a bug, not a converter that cannot handle a model)
_ENVIRONMENT_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
)


def environment_failure(err: BaseException | None) -> bool:
    """Did `err` come from the machine: a full disk, an I/O error, permissions? TensorFlow
    reports a failed write as its own error type (e.g. ResourceExhaustedError), with the
    system's message in the text."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
            return True
        if any(os.strerror(number) in str(err) for number in _ENVIRONMENT_ERRNOS):
            return True
        err = err.__cause__ or err.__context__
    return False


def describe(err: BaseException, limit: int = 300) -> str:
    """'<exception type>: <first line of its message>' (at most `limit` characters)."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
