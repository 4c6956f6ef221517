"""The ``celery-warden`` command line: one module per sub-command.

``main()`` is the only place errors become exit codes: a :class:`WardenError` prints one
line on stderr and exits with its code (2 usage, 1 runtime); a traceback reaches the
user only with ``-v``.
"""

from __future__ import annotations

import logging
import sys

import click

from celery_warden._version import __version__
from celery_warden.commands import collect, demo, diagnose, report, run, watch
from celery_warden.commands._common import Context
from celery_warden.exceptions import WardenError

__all__ = ["cli", "main"]

_verbosity = 0  # how many -v the last invocation had

_EPILOG = """\b
Examples:
  celery-warden demo                                  see it find a leak, no server needed
  celery-warden run -- celery -A proj worker -c 4     start a worker under watch
  celery-warden watch                                 attach to running workers
  celery-warden report                                verdicts on the last session
  celery-warden report --format json > report.json
  celery-warden diagnose --worker w1 --task proj.tasks.fetch    what its calls keep
"""


@click.group(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Say more (-vv: debug, and show tracebacks).")
@click.version_option(__version__, "--version", prog_name="celery-warden")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Watch the memory of Celery workers, say why it grows, and where.

    celery-warden samples every process of a worker tree (master, pool children, what
    tasks spawn), records every task through an in-worker probe, keeps the history in
    a local SQLite store and turns it into verdicts: leak, warming-up, stable.
    """
    global _verbosity  # noqa: PLW0603 - main() reads it after click has returned
    _verbosity = verbose
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="celery-warden: %(message)s", stream=sys.stderr)
    ctx.obj = Context(verbose=verbose)


for _module in (run, watch, report, diagnose, demo, collect):
    cli.add_command(_module.command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code.

    >>> main(["--version"])  # doctest: +SKIP
    celery-warden, version ...
    """
    try:
        result = cli.main(args=argv, prog_name="celery-warden", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("celery-warden: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except WardenError as exc:
        if _verbosity > 1:
            raise
        click.echo(f"celery-warden: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0
