"""The public surface: what `import celery_warden` and `celery-warden --help` promise."""

from __future__ import annotations

import pytest

import celery_warden
from celery_warden.commands import main


def test_the_public_names_are_pinned() -> None:
    """`__all__` changes only on purpose: it is the public API."""
    assert celery_warden.__all__ == ["WardenError", "__version__", "install"]


def test_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` lists the sub-commands and shows how to start a worker under watch."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "celery-warden run -- celery -A proj worker" in out
    for command in ("run", "watch", "report", "demo"):
        assert command in out
    assert "collect" not in out  # started by install(app), not by a person


def test_celery_finds_the_warden_plugin() -> None:
    """`celery warden` is found through Celery's `celery.commands` entry point group."""
    from importlib.metadata import entry_points

    (plugin,) = entry_points(group="celery.commands", name="warden")
    assert plugin.load().name == "warden"


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the package's version."""
    assert main(["--version"]) == 0
    assert celery_warden.__version__ in capsys.readouterr().out


def test_an_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in an option exits 2 with click's usage line, no traceback."""
    assert main(["report", "--formt", "json"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err
    assert "Traceback" not in err
