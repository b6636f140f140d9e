"""Finding a configured Prefect server without importing Prefect (the no-op `headstart run`)."""

from __future__ import annotations

import pytest

from headstart import prefectconfig


@pytest.fixture
def clean(monkeypatch, tmp_path):
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    (tmp_path / "project").mkdir()
    return tmp_path / "project"


def test_nothing_configured_means_no_server(clean):
    assert prefectconfig.api_url(clean) is None


def test_environment_wins(clean, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://env:4200/api")
    (clean / ".env").write_text("PREFECT_API_URL=http://dotenv:4200/api\n")
    assert prefectconfig.api_url(clean) == "http://env:4200/api"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (".env", "# a comment\nexport PREFECT_API_URL='http://x:4200/api'\n"),
        ("prefect.toml", '[api]\nurl = "http://x:4200/api"\n'),
        (
            "pyproject.toml",
            '[project]\nname = "p"\n[tool.prefect.api]\nurl = "http://x:4200/api"\n',
        ),
    ],
)
def test_project_files(clean, name, text):
    (clean / name).write_text(text)
    assert prefectconfig.api_url(clean) == "http://x:4200/api"


def test_the_active_profile_is_read(clean, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "remote"\n[profiles.ephemeral]\n'
        '[profiles.remote]\nPREFECT_API_URL = "http://remote:4200/api"\n'
    )
    assert prefectconfig.api_url(clean) == "http://remote:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert prefectconfig.api_url(clean) is None


def test_a_broken_toml_file_is_not_a_server(clean):
    (clean / "prefect.toml").write_text("[api\nurl = ")
    assert prefectconfig.api_url(clean) is None
