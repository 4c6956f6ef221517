"""``celery warden``: celery-warden inside Celery's own command line.

Celery loads sub-commands from the ``celery.commands`` entry point group, so once
celery-warden is installed beside Celery::

    celery -A proj warden run worker -l info -c 4     # the worker, under the warden
    celery -A proj warden report                      # what `celery-warden report` says
    celery -A proj warden diagnose --worker w1 --task proj.tasks.fetch

``run`` takes the arguments of a ``celery`` sub-command (``worker ...``) and starts
``python -m celery`` with the global options given before ``warden`` (``-A``, ``-b``,
``--result-backend``, ``--loader``, ``--config``, ``--workdir``), so the worker is the
same one ``celery -A proj worker ...`` would have started.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import click

from celery_warden.commands._common import (
    Context,
    guard_options,
    guard_overrides,
    seconds_option,
    store_option,
)
from celery_warden.exceptions import WardenError

__all__ = ["warden"]

# Celery's global options a worker needs again, by their click parameter name.
_GLOBAL_OPTIONS = {
    "app": "-A",
    "broker": "-b",
    "result_backend": "--result-backend",
    "loader": "--loader",
    "config": "--config",
    "workdir": "--workdir",
}


def _celery_globals(ctx: click.Context) -> list[str]:
    """The options given to ``celery`` itself, to give them again to the worker."""
    root = ctx.find_root()
    argv = []
    for name, flag in _GLOBAL_OPTIONS.items():
        value = root.params.get(name)
        if value:
            argv += [flag, str(value)]
    if root.params.get("no_color"):
        argv.append("--no-color")
    if root.params.get("quiet"):
        argv.append("--quiet")
    if root.params.get("skip_checks"):
        argv.append("--skip-checks")
    return argv


class _WardenGroup(click.Group):
    """Celery imports every plugin on every ``celery`` call (a worker's start too), so
    this module stays light and loads ``report``, ``watch`` and ``diagnose`` only when
    asked for. Celery's CLI prints tracebacks for unknown exceptions: ours become one
    line."""

    _lazy = ("diagnose", "report", "watch")

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module = importlib.import_module(f"celery_warden.commands.{cmd_name}")
            return _exiting_with_its_code(module.command)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except WardenError as exc:
            click.echo(f"celery-warden: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group("warden", cls=_WardenGroup)
@click.pass_context
def warden(ctx: click.Context) -> None:
    """Watch this app's workers' memory, say why it grows and where (celery-warden)."""
    ctx.obj = Context(verbose=0)


# Options after the celery sub-command (`worker --config x`) are the worker's.
@warden.command(
    "run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@seconds_option(
    "--interval",
    "interval_seconds",
    default=1.0,
    minimum=0.05,
    help="Seconds between sweeps of the worker tree.",
)
@click.option("--no-probe", is_flag=True, help="Do not attach the in-worker probe.")
@click.option(
    "--dry-run", is_flag=True, help="Let the guard decide and record, but send no signal."
)
@guard_options
@store_option
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(
    ctx: click.Context,
    /,
    interval_seconds: float,
    no_probe: bool,
    dry_run: bool,
    config_path: Path | None,
    print_config: bool,
    store_path: Path | None,
    celery_args: tuple[str, ...],
    **flags: Any,
) -> None:
    """Start a worker (CELERY_ARGS: `worker ...`) under the warden.

    \b
    Example:
      celery -A proj warden run worker -l info -c 4
    """
    from celery_warden.commands.run import run_under_warden
    from celery_warden.guard import dump_config, guard_config

    config = guard_config(config_path, guard_overrides(flags), act=not dry_run)
    if print_config:
        click.echo(dump_config(config), nl=False)
        ctx.exit(0)
    if not celery_args:
        raise click.UsageError("give the celery sub-command to run, e.g. `warden run worker`")
    command = [sys.executable, "-m", "celery", *_celery_globals(ctx), *celery_args]
    ctx.exit(run_under_warden(command, interval_seconds, no_probe, store_path, guard=config))


def _exiting_with_its_code(command: click.Command) -> click.Command:
    """A copy of one of our commands that exits with the code it returns: ``main``
    does that for ``celery-warden``, nothing does under Celery's CLI."""
    callback = command.callback
    assert callback is not None

    def exiting(*args: object, **kwargs: object) -> None:
        code = callback(*args, **kwargs)
        if isinstance(code, int) and code:
            click.get_current_context().exit(code)

    return click.Command(
        command.name,
        params=command.params,
        callback=exiting,
        help=command.help,
        epilog=command.epilog,
        short_help=command.short_help,
        context_settings=command.context_settings,
    )
