"""Whether a Prefect API server is configured, read the way Prefect 3 reads its settings but
without importing Prefect (≈ 2 s): environment, `.env`, `prefect.toml`, `pyproject.toml`
`[tool.prefect]`, then the active profile."""

from __future__ import annotations

import os
from pathlib import Path

import tomlkit  # a DVC dependency; tomllib is Python >= 3.11 only
from tomlkit.exceptions import TOMLKitError


def _dotenv(path: Path) -> dict[str, str]:
    values = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.strip().removeprefix("export ").partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip().strip("'\"")
    return values


def _toml(path: Path) -> dict:
    try:
        return tomlkit.parse(path.read_text()).unwrap() if path.is_file() else {}
    except (TOMLKitError, UnicodeDecodeError):
        return {}


def api_url(root: Path | str = ".") -> str | None:
    """PREFECT_API_URL as Prefect would resolve it for a command run in `root`, or None."""
    root = Path(root)
    found = os.environ.get("PREFECT_API_URL") or _dotenv(root / ".env").get("PREFECT_API_URL")
    if found:
        return found
    for table in (
        _toml(root / "prefect.toml"),
        _toml(root / "pyproject.toml").get("tool", {}).get("prefect", {}),
    ):
        url = table.get("api", {}).get("url") if isinstance(table.get("api"), dict) else None
        if url:
            return str(url)
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles = _toml(Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")))
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None
