"""The guard's policies: every tunable with its unit in its name and its default.

Loaded from a TOML file (``--config`` or ``$CELERY_WARDEN_CONFIG``) and overridden by
command-line flags; validated as a whole before anything starts, because a typo here
decides which processes get killed: a bad value raises :class:`ConfigError` naming the
key, the value and the expected form. ``--print-config`` writes the effective
configuration as TOML that loads back to the same value (docs/configuration.md).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from celery_warden.exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV",
    "GuardConfig",
    "HangPolicy",
    "MemoryPolicy",
    "OrphanPolicy",
    "PoisonPolicy",
    "RecyclePolicy",
    "config_from_env_path",
    "dump_config",
    "load_config",
]

CONFIG_ENV = "CELERY_WARDEN_CONFIG"


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    """Thresholds on a pool child's *current* private memory, never its peak.

    0 turns a threshold off. ``metric`` is ``"uss"`` (what the kernel frees when the child
    exits) or ``"pss"`` (USS plus its share of pages shared with the master).
    """

    metric: str = "uss"
    # >= 0, 0 off, below child_hard_mib: over it the child leaves after its current task.
    child_soft_mib: float = 0.0
    child_hard_mib: float = 0.0  # >= 0, 0 off: over it TERM, then KILL after the grace
    # >= 0, 0 off: recycle softly when the measured growth rate would cross the hard
    # threshold within this horizon. Needs child_hard_mib.
    projected_horizon_seconds: float = 0.0
    # >= 0, 0 off: reported, as recycling children never fixes a master.
    master_budget_mib: float = 0.0
    # "report", or "warm-restart": TERM to the master only, KILL its tree after the grace.
    master_action: str = "report"
    sustain_samples: int = 2  # >= 1: consecutive readings over a threshold before acting
    hysteresis_mib: float = 16.0  # >= 0: a tripped threshold clears only this far below it


@dataclass(frozen=True, slots=True)
class RecyclePolicy:
    """How children are recycled, and how often at most."""

    grace_seconds: float = 10.0  # > 0: between TERM and KILL
    max_parallel: int = 1  # >= 1: children of one worker being recycled at once
    min_serving: int = 1  # >= 0: children of one worker never recycled below this many
    min_interval_seconds: float = 2.0  # >= 0: between two hard recycles in one worker
    # >= 1: recycles of one worker per hour; beyond, report only (0 would never recycle:
    # `watch` without --act is the way to only report).
    max_per_hour: int = 60


@dataclass(frozen=True, slots=True)
class HangPolicy:
    """When a running task counts as hung, and what is captured before the kill."""

    enabled: bool = True
    # A name seen at least min_history times is hung past max(history_min_seconds,
    # factor x its p99 duration); a name with less history (and no Celery time limit)
    # only past min_seconds, a cautious default: a long batch job seen for the first
    # time must not be killed. Both > 0; factor >= 1 (below, a task's usual duration
    # would count as hung); min_history >= 1.
    min_seconds: float = 1800.0
    history_min_seconds: float = 60.0
    factor: float = 10.0
    min_history: int = 20
    # >= 1: a task with a Celery time limit is left to Celery until limit x this factor.
    time_limit_factor: float = 1.5
    # > 0: a child running a task whose heartbeats stopped this long (the GIL held in C
    # code, or the process stopped) is hung whatever the task's usual time.
    stalled_seconds: float = 120.0
    stack: str = "auto"  # "auto" (py-spy, else faulthandler), "py-spy", "faulthandler", "none"
    stack_timeout_seconds: float = 10.0  # > 0: longest wait for the stack before the kill
    # >= 0: a prefork master whose children all sat idle this long while its queues hold
    # messages has stopped consuming: reported (0: off).
    master_idle_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class OrphanPolicy:
    """Processes of a worker's recorded lineage that outlived its master."""

    action: str = "kill"  # "kill" or "report"
    grace_seconds: float = 30.0  # > 0: after the master's death, before acting


@dataclass(frozen=True, slots=True)
class PoisonPolicy:
    """A task id that keeps getting its child killed is reported, not killed again."""

    max_kills: int = 3  # >= 1: kills of one task id's child within the window
    window_seconds: float = 3600.0  # > 0


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Everything the guard decides by. ``act`` False: decide and record, send nothing.

    ``act`` is never read from the file: the command sets it, so that one file serves
    both a ``watch`` that only reports and a ``run`` that acts.
    """

    act: bool = True
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    recycle: RecyclePolicy = field(default_factory=RecyclePolicy)
    hang: HangPolicy = field(default_factory=HangPolicy)
    orphans: OrphanPolicy = field(default_factory=OrphanPolicy)
    poison: PoisonPolicy = field(default_factory=PoisonPolicy)


@dataclass(frozen=True, slots=True)
class _Rule:
    """What one key accepts beyond its type (taken from its default), and the line that
    explains it above the key in ``--print-config``."""

    help: str
    low: float = 0.0  # numbers: the smallest value accepted
    strict: bool = False  # numbers: ``low`` itself is refused
    off: bool = False  # numbers: 0 turns the feature off
    choices: tuple[str, ...] = ()  # strings: the only values accepted


_RULES: dict[str, _Rule] = {
    "memory.metric": _Rule(
        '"uss" (freed when the child exits) or "pss" (plus its share of the master\'s pages)',
        choices=("uss", "pss"),
    ),
    "memory.child_soft_mib": _Rule(
        "over it, the child leaves after its current task (0: off)", off=True
    ),
    "memory.child_hard_mib": _Rule(
        "over it, TERM, then KILL after recycle.grace_seconds (0: off)", off=True
    ),
    "memory.projected_horizon_seconds": _Rule(
        "recycle softly when growth would cross child_hard_mib within this (0: off)", off=True
    ),
    "memory.master_budget_mib": _Rule(
        "over it, the master is reported or warm-restarted, see master_action (0: off)",
        off=True,
    ),
    "memory.master_action": _Rule(
        '"report", or "warm-restart": TERM to the master, KILL its tree after the grace',
        choices=("report", "warm-restart"),
    ),
    "memory.sustain_samples": _Rule("consecutive readings over a threshold before acting", low=1),
    "memory.hysteresis_mib": _Rule("a tripped threshold clears only this far below it"),
    "recycle.grace_seconds": _Rule("between TERM and KILL", strict=True),
    "recycle.max_parallel": _Rule("children of one worker being recycled at once", low=1),
    "recycle.min_serving": _Rule("children of one worker never recycled below this many"),
    "recycle.min_interval_seconds": _Rule("between two hard recycles in one worker"),
    "recycle.max_per_hour": _Rule("recycles of one worker per hour; beyond, report only", low=1),
    "hang.enabled": _Rule("false: no task is ever treated as hung"),
    "hang.min_seconds": _Rule(
        "a task name with too little history is hung only past this", strict=True
    ),
    "hang.history_min_seconds": _Rule(
        "no task with history counts as hung before it ran this long", strict=True
    ),
    "hang.factor": _Rule("hung past factor x the task name's p99 duration", low=1),
    "hang.min_history": _Rule(
        "runs of a task name before its p99 counts; fewer: min_seconds", low=1
    ),
    "hang.time_limit_factor": _Rule(
        "a task with a Celery time limit is left to Celery until limit x this", low=1
    ),
    "hang.stalled_seconds": _Rule(
        "a child whose task's heartbeats stopped this long is hung", strict=True
    ),
    "hang.stack": _Rule(
        'stack captured before the kill: "auto", "py-spy", "faulthandler" or "none"',
        choices=("auto", "py-spy", "faulthandler", "none"),
    ),
    "hang.master_idle_seconds": _Rule(
        "a master whose children all idled this long while its queues hold work (0: off)",
        off=True,
    ),
    "hang.stack_timeout_seconds": _Rule(
        "longest wait for the stack before killing anyway", strict=True
    ),
    "orphans.action": _Rule(
        '"kill" or "report" a process that outlived its worker\'s master',
        choices=("kill", "report"),
    ),
    "orphans.grace_seconds": _Rule("after the master's death, before acting", strict=True),
    "poison.max_kills": _Rule(
        "kills of one task id's child within window_seconds; beyond, report only", low=1
    ),
    "poison.window_seconds": _Rule("the window max_kills are counted in", strict=True),
}

_SECTIONS = tuple(f.name for f in fields(GuardConfig) if f.name != "act")
# Every key's default, dotted ("memory.child_hard_mib"): its type is the key's type.
_DEFAULTS: dict[str, object] = {
    f"{section}.{f.name}": getattr(getattr(GuardConfig(), section), f.name)
    for section in _SECTIONS
    for f in fields(getattr(GuardConfig(), section))
}
# A suffix names the unit; a string with a unit in it gets told how to write the number.
_UNITS = {
    "_mib": ("MiB", "write 1024 for 1 GiB"),
    "_seconds": ("seconds", "write 600 for 10 minutes"),
}
_NUMBER_WITH_UNIT = re.compile(r"\s*[+-]?[\d.]+\s*[A-Za-z]+\s*")
_ACT_IS_THE_COMMANDS = (
    "not a file key: the command decides (run acts unless --dry-run, watch acts only with --act)"
)


def config_from_env_path() -> Path | None:
    """The file ``$CELERY_WARDEN_CONFIG`` names, for when ``--config`` is not given.

    An empty value means no file, so that ``CELERY_WARDEN_CONFIG= cmd`` can switch off a
    file set higher up.
    """
    value = os.environ.get(CONFIG_ENV, "")
    return Path(value) if value else None


def load_config(path: Path | None, overrides: Mapping[str, object] | None = None) -> GuardConfig:
    """The configuration from ``path`` (None: the defaults), then ``overrides``.

    ``overrides`` maps dotted keys (``"memory.child_hard_mib"``, or ``"act"``) to the
    values of command-line flags, checked like the file's; a None value is a flag that was
    not given and is skipped. Raises :class:`ConfigError` on the first bad key or value,
    and for a file that others could write (they would decide what the warden kills).
    """
    values = _file_values(path) if path is not None else {}
    act = True
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "act":
            if not isinstance(value, bool):
                raise _bad(key, value, "from the command line", "expected true or false")
            act = value
        else:
            values[key] = _checked(key, value, "from the command line")
    defaults = GuardConfig(act=act)
    policies = {
        section: replace(
            getattr(defaults, section),
            **{
                key.partition(".")[2]: value
                for key, value in values.items()
                if key.partition(".")[0] == section
            },
        )
        for section in _SECTIONS
    }
    config = replace(defaults, **policies)
    _check_together(config)
    return config


def dump_config(config: GuardConfig) -> str:
    """``config`` as a TOML file that :func:`load_config` reads back to it (``act`` aside).

    Every key is written, even at its default, so the output shows the whole effective
    configuration and can be edited into a file; ``act`` is a comment because the command,
    not the file, sets it.
    """
    lines = [
        "# celery-warden guard configuration (docs/configuration.md); load it with --config.",
        f"# act = {_toml(config.act)}  (set by the command: run acts, watch needs --act)",
    ]
    for section in _SECTIONS:
        policy = getattr(config, section)
        lines += ["", f"[{section}]"]
        for f in fields(policy):
            lines.append(f"# {_RULES[f'{section}.{f.name}'].help}")
            lines.append(f"{f.name} = {_toml(getattr(policy, f.name))}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    """A scalar as TOML. Floats use repr, which TOML reads back to the same float."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'  # only the choices of _RULES, none needing an escape
    return repr(value)


def _file_values(path: Path) -> dict[str, object]:
    """The checked values of the file's keys, dotted."""
    where = f"in {path}"
    values: dict[str, object] = {}
    for name, table in _read_toml(path).items():
        if name == "act":
            raise _bad(name, table, where, _ACT_IS_THE_COMMANDS)
        if name not in _SECTIONS:
            if isinstance(table, dict):
                raise ConfigError(
                    f"config: [{name}] ({where}): unknown section, expected one of "
                    + ", ".join(f"[{section}]" for section in _SECTIONS)
                    + _did_you_mean(name, _SECTIONS)
                )
            raise _outside_any_section(name, table, where)
        if not isinstance(table, dict):
            raise _bad(name, table, where, f"expected a [{name}] section")
        for key, value in table.items():
            if key == "act":
                raise _bad(f"{name}.act", value, where, _ACT_IS_THE_COMMANDS)
            values[f"{name}.{key}"] = _checked(f"{name}.{key}", value, where)
    return values


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file, refused before parsing if anyone but its owner could change it."""
    try:
        with path.open("rb") as file:
            _refuse_if_others_can_write(path, os.fstat(file.fileno()))
            raw = file.read()
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path} is not UTF-8 text: {exc}") from exc
    except ValueError as exc:  # TOMLDecodeError, or an integer of over 4300 digits
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from exc


def _refuse_if_others_can_write(path: Path, st: os.stat_result) -> None:
    """The file decides which processes get killed, so only its owner may be able to
    change it, and the owner must be us or root (checked on the open file, so the file
    read is the file checked)."""
    why = "someone else could change what the warden kills"
    others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if others:
        who = (
            "group and others"
            if others == stat.S_IWGRP | stat.S_IWOTH
            else ("its group" if others == stat.S_IWGRP else "others")
        )
        raise ConfigError(
            f"config: {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"{why}; run chmod go-w {shlex.quote(str(path))}"
        )
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise ConfigError(
            f"config: {path} is owned by uid {st.st_uid}, not by you (uid {me}) or root: "
            f"{why}; use a copy you own"
        )


def _checked(key: str, value: object, where: str) -> object:
    """``value`` if ``key`` accepts it (an int made a float for a float key), else a
    :class:`ConfigError` naming the key, the value and what it expects."""
    rule = _RULES.get(key)
    if rule is None:
        raise _unknown(key, value, where)
    default = _DEFAULTS[key]
    expected = _expected(key, rule)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise _bad(key, value, where, expected)
    if isinstance(default, str):
        if value in rule.choices:
            return value
        hint = _did_you_mean(value.lower(), rule.choices) if isinstance(value, str) else ""
        raise _bad(key, value, where, expected + hint)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, where, expected + _number_hint(key, value))
    whole = isinstance(default, int)
    in_range = value > rule.low if rule.strict else value >= rule.low
    if (whole and not isinstance(value, int)) or not _finite(value) or not in_range:
        raise _bad(key, value, where, expected)
    return value if whole else float(value)


def _finite(value: float) -> bool:
    """Not nan nor infinite, and not an integer too large to be a float either."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _unknown(key: str, value: object, where: str) -> ConfigError:
    """The closest valid key, without its section when it is in the same one."""
    section = key.partition(".")[0]
    match = difflib.get_close_matches(key, _RULES, n=1)
    if not match:
        return _bad(key, value, where, "unknown key")
    suggestion = match[0]
    if suggestion.partition(".")[0] == section:
        suggestion = suggestion.partition(".")[2]
    return _bad(key, value, where, f"unknown key; did you mean {suggestion!r}?")


def _outside_any_section(name: str, value: object, where: str) -> ConfigError:
    """A policy key written above every section header: suggest it dotted, which TOML
    also accepts at the top level."""
    match = difflib.get_close_matches(name, [key.partition(".")[2] for key in _RULES], n=1)
    dotted = [key for key in _RULES if match and key.partition(".")[2] == match[0]]
    hint = f"; did you mean {dotted[0]!r}?" if dotted else ""
    return _bad(name, value, where, f"a key outside any section{hint}")


def _expected(key: str, rule: _Rule) -> str:
    """What ``key`` accepts, in words: 'a number of MiB >= 0 (0 turns it off)'."""
    default = _DEFAULTS[key]
    if isinstance(default, bool):
        return "expected true or false"
    if isinstance(default, str):
        return "expected one of " + ", ".join(repr(choice) for choice in rule.choices)
    text = "expected a whole number" if isinstance(default, int) else "expected a number"
    for suffix, (unit, _) in _UNITS.items():
        if key.endswith(suffix):
            text += f" of {unit}"
    text += f" {'>' if rule.strict else '>='} {rule.low:g}"
    return text + " (0 turns it off)" if rule.off else text


def _number_hint(key: str, value: object) -> str:
    """Why a non-number was refused, for the two mistakes people make: true for 1, and a
    unit in the value when the key's name already has one."""
    if isinstance(value, bool):
        return "; true and false are not numbers"
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        pass
    else:
        return "; write the number without quotes"
    for suffix, (_, example) in _UNITS.items():
        if key.endswith(suffix) and _NUMBER_WITH_UNIT.fullmatch(value):
            return f"; the unit is in the key's name: {example}"
    return ""


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _bad(key: str, value: object, where: str, expected: str) -> ConfigError:
    return ConfigError(f"config: {key} = {value!r} ({where}): {expected}")


def _check_together(config: GuardConfig) -> None:
    """The rules between keys, checked once the file and the flags are merged, since
    either may set either key."""
    memory = config.memory
    soft, hard = memory.child_soft_mib, memory.child_hard_mib
    if soft and hard and soft >= hard:
        raise ConfigError(
            f"config: memory.child_soft_mib = {soft!r}: expected less than "
            f"memory.child_hard_mib = {hard!r} (the soft threshold comes first), "
            "or 0 to turn it off"
        )
    if memory.projected_horizon_seconds and not hard:
        raise ConfigError(
            f"config: memory.projected_horizon_seconds = {memory.projected_horizon_seconds!r}:"
            " expected 0 (off) while memory.child_hard_mib is 0: the projection aims at the"
            " hard threshold"
        )
