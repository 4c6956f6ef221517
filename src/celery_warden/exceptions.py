"""The errors celery-warden raises, each carrying the exit code the CLI uses.

::

    WardenError                    exit 1: something failed at run time
    ├── UsageError                 exit 2: the command line names something wrong
    │   ├── NoCommand              `run` with nothing after `--`
    │   ├── CommandNotFound        `run -- X` where X cannot be executed
    │   ├── ProcessNotFound        `--pid N` and there is no process N
    │   ├── NotAWorker             `--pid N` and N is not a Celery worker
    │   ├── NoWorkerFound          `watch` found no worker to attach to
    │   └── ConfigError            the guard's config (file or flags) is malformed
    └── StoreError                 the store cannot be used; nothing in it was changed
        ├── StoreNotADatabase      the file is not an SQLite database
        ├── StoreTooNew            written by a newer celery-warden
        ├── StoreNotWritable       the file or its directory is read-only
        └── StoreEmpty             nothing recorded yet (for `report`)

Messages say what failed, show the value and say what to do.
"""

from __future__ import annotations

__all__ = [
    "CommandNotFound",
    "ConfigError",
    "NoCommand",
    "NoWorkerFound",
    "NotAWorker",
    "ProcessNotFound",
    "StoreEmpty",
    "StoreError",
    "StoreNotADatabase",
    "StoreNotWritable",
    "StoreTooNew",
    "UsageError",
    "WardenError",
]


class WardenError(Exception):
    """Base of every error celery-warden raises on purpose."""

    exit_code = 1


class UsageError(WardenError):
    """The command line names something that cannot be used."""

    exit_code = 2


class NoCommand(UsageError):
    """`run` was given no worker command."""


class CommandNotFound(UsageError):
    """The worker command could not be started."""


class ProcessNotFound(UsageError):
    """No process has the given PID."""


class NotAWorker(UsageError):
    """The process exists but is not a Celery worker."""


class NoWorkerFound(UsageError):
    """No running Celery worker matched."""


class ConfigError(UsageError):
    """The guard's configuration is malformed: the message names the key, the bad value
    and the expected form; nothing was started."""


class StoreError(WardenError):
    """The store cannot be opened or written."""


class StoreNotADatabase(StoreError):
    """The store path holds something that is not an SQLite database."""


class StoreTooNew(StoreError):
    """The store's schema is newer than this celery-warden understands."""


class StoreNotWritable(StoreError):
    """The store or its directory cannot be written."""


class StoreEmpty(StoreError):
    """The store holds no session to report on."""
