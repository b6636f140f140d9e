"""Model summaries as text artifacts."""

from __future__ import annotations

from pathlib import Path

from headstart.files import write_text


def write_summary(model, path: Path | str) -> Path:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=110)
    return write_text(path, "\n".join(lines) + "\n")
