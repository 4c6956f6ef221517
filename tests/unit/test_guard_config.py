"""The guard's configuration: the TOML file, the flags over it, and --print-config."""

from __future__ import annotations

import os
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from celery_warden.exceptions import ConfigError
from celery_warden.guard._config import (
    CONFIG_ENV,
    GuardConfig,
    HangPolicy,
    MemoryPolicy,
    OrphanPolicy,
    PoisonPolicy,
    RecyclePolicy,
    config_from_env_path,
    dump_config,
    load_config,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SECTIONS = ("memory", "recycle", "hang", "orphans", "poison")

# Every field away from its default (test_every_field_is_changed checks it), within the
# rules between keys, with floats that are whole, tiny and huge.
CHANGED = GuardConfig(
    memory=MemoryPolicy(
        metric="pss",
        child_soft_mib=1536.5,
        child_hard_mib=2048.0,
        projected_horizon_seconds=300.0,
        master_budget_mib=1e16,
        master_action="warm-restart",
        sustain_samples=5,
        hysteresis_mib=0.0,
    ),
    recycle=RecyclePolicy(
        grace_seconds=2.5, max_parallel=3, min_serving=0, min_interval_seconds=0.0, max_per_hour=7
    ),
    hang=HangPolicy(
        enabled=False,
        min_seconds=0.001,
        history_min_seconds=0.5,
        factor=2.25,
        min_history=1,
        time_limit_factor=1.0,
        stalled_seconds=1e6,
        stack="faulthandler",
        stack_timeout_seconds=0.1,
        master_idle_seconds=0.0,
    ),
    orphans=OrphanPolicy(action="report", grace_seconds=7.0),
    poison=PoisonPolicy(max_kills=1, window_seconds=86400.0),
)


def _write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    """A config file with an explicit mode, so the test does not depend on the umask."""
    path = tmp_path / "warden.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _refused(path: Path | None, overrides: dict[str, object] | None = None) -> str:
    """The message of the ConfigError loading raises, after checking its exit code and that
    it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config")
    return message


# --- bad files: each message names the key, shows the value and says what is expected ---

BAD_FILES = [
    # unknown keys and sections, with the closest valid one
    ("[memory]\nchild_hard_mb = 1024", ["memory.child_hard_mb = 1024", "unknown key",
                                       "did you mean 'child_hard_mib'?"]),
    ("[memory]\ngrace_seconds = 5", ["memory.grace_seconds = 5",
                                     "did you mean 'recycle.grace_seconds'?"]),
    ("[poison]\nzzz = 1", ["poison.zzz = 1", "unknown key"]),
    ("[mem]\nchild_hard_mib = 1", ["[mem]", "unknown section", "[memory], [recycle]",
                                   "did you mean 'memory'?"]),
    ("child_hard_mib = 1024", ["child_hard_mib = 1024", "outside any section",
                               "did you mean 'memory.child_hard_mib'?"]),
    ("memory = 3", ["memory = 3", "expected a [memory] section"]),
    # act belongs to the command
    ("act = true", ["act = True", "not a file key", "--dry-run", "--act"]),
    ("[memory]\nact = false", ["memory.act = False", "not a file key"]),
    # below the lowest value a key accepts
    ("[memory]\nchild_hard_mib = -1", ["memory.child_hard_mib = -1", "MiB >= 0",
                                       "(0 turns it off)"]),
    ("[memory]\nprojected_horizon_seconds = -1", ["memory.projected_horizon_seconds = -1",
                                                  "seconds >= 0"]),
    ("[memory]\nmaster_budget_mib = -0.5", ["memory.master_budget_mib = -0.5", "MiB >= 0"]),
    ("[memory]\nsustain_samples = 0", ["memory.sustain_samples = 0", "whole number >= 1"]),
    ("[memory]\nhysteresis_mib = -16", ["memory.hysteresis_mib = -16", "MiB >= 0"]),
    ("[recycle]\ngrace_seconds = 0", ["recycle.grace_seconds = 0", "seconds > 0"]),
    ("[recycle]\nmax_parallel = 0", ["recycle.max_parallel = 0", "whole number >= 1"]),
    ("[recycle]\nmin_serving = -1", ["recycle.min_serving = -1", "whole number >= 0"]),
    ("[recycle]\nmin_interval_seconds = -2", ["recycle.min_interval_seconds = -2",
                                              "seconds >= 0"]),
    ("[recycle]\nmax_per_hour = 0", ["recycle.max_per_hour = 0", "whole number >= 1"]),
    ("[hang]\nmin_seconds = 0", ["hang.min_seconds = 0", "seconds > 0"]),
    ("[hang]\nfactor = 0.5", ["hang.factor = 0.5", "a number >= 1"]),
    ("[hang]\nmin_history = 0", ["hang.min_history = 0", "whole number >= 1"]),
    ("[hang]\ntime_limit_factor = 0.9", ["hang.time_limit_factor = 0.9", "a number >= 1"]),
    ("[hang]\nstalled_seconds = 0.0", ["hang.stalled_seconds = 0.0", "seconds > 0"]),
    ("[hang]\nstack_timeout_seconds = -1", ["hang.stack_timeout_seconds = -1", "seconds > 0"]),
    ("[orphans]\ngrace_seconds = 0", ["orphans.grace_seconds = 0", "seconds > 0"]),
    ("[poison]\nmax_kills = 0", ["poison.max_kills = 0", "whole number >= 1"]),
    ("[poison]\nwindow_seconds = 0", ["poison.window_seconds = 0", "seconds > 0"]),
    # the rules between keys
    ("[memory]\nchild_soft_mib = 2048\nchild_hard_mib = 1024",
     ["memory.child_soft_mib = 2048.0", "less than memory.child_hard_mib = 1024.0"]),
    ("[memory]\nchild_soft_mib = 1024\nchild_hard_mib = 1024",
     ["memory.child_soft_mib = 1024.0", "less than memory.child_hard_mib"]),
    ("[memory]\nprojected_horizon_seconds = 300",
     ["memory.projected_horizon_seconds = 300.0", "memory.child_hard_mib is 0"]),
    # a unit in the value, when the key's name has it
    ('[memory]\nchild_hard_mib = "1GB"', ["memory.child_hard_mib = '1GB'",
                                          "the unit is in the key's name",
                                          "write 1024 for 1 GiB"]),
    ('[memory]\nchild_hard_mib = "1GiB"', ["'1GiB'", "write 1024 for 1 GiB"]),
    ('[memory]\nchild_soft_mib = "512 M"', ["'512 M'", "write 1024 for 1 GiB"]),
    ('[recycle]\ngrace_seconds = "10s"', ["recycle.grace_seconds = '10s'",
                                          "the unit is in the key's name",
                                          "write 600 for 10 minutes"]),
    ('[memory]\nchild_hard_mib = "1024"', ["'1024'", "without quotes"]),
    ('[hang]\nfactor = "ten"', ["hang.factor = 'ten'", "expected a number >= 1"]),
    # TOML true is not 1, and 1 is not true
    ("[memory]\nchild_hard_mib = true", ["memory.child_hard_mib = True",
                                         "true and false are not numbers"]),
    ("[memory]\nsustain_samples = true", ["memory.sustain_samples = True", "whole number"]),
    ("[hang]\nenabled = 1", ["hang.enabled = 1", "expected true or false"]),
    ('[hang]\nenabled = "yes"', ["hang.enabled = 'yes'", "expected true or false"]),
    # numbers that are not numbers, or not whole
    ("[memory]\nchild_hard_mib = nan", ["memory.child_hard_mib = nan", "MiB >= 0"]),
    ("[memory]\nchild_hard_mib = inf", ["memory.child_hard_mib = inf", "MiB >= 0"]),
    ("[recycle]\ngrace_seconds = -inf", ["recycle.grace_seconds = -inf", "seconds > 0"]),
    ("[memory]\nchild_hard_mib = 1" + "0" * 400, ["memory.child_hard_mib = 1000", "MiB >= 0"]),
    ("[recycle]\nmax_per_hour = 1" + "0" * 400, ["recycle.max_per_hour = 1000", "whole number"]),
    ("[memory]\nsustain_samples = 2.5", ["memory.sustain_samples = 2.5", "whole number"]),
    ("[recycle]\nmax_parallel = 2.0", ["recycle.max_parallel = 2.0", "whole number"]),
    ("[memory]\nchild_hard_mib = [1024]", ["memory.child_hard_mib = [1024]", "a number"]),
    ("[memory.child_hard_mib]\nvalue = 1", ["memory.child_hard_mib = {'value': 1}",
                                            "a number"]),
    # the enum-like strings
    ('[memory]\nmetric = "rss"', ["memory.metric = 'rss'", "one of 'uss', 'pss'"]),
    ('[memory]\nmetric = "USS"', ["'USS'", "did you mean 'uss'?"]),
    ("[memory]\nmetric = 1", ["memory.metric = 1", "one of 'uss', 'pss'"]),
    ('[memory]\nmaster_action = "restart"', ["memory.master_action = 'restart'",
                                             "one of 'report', 'warm-restart'"]),
    ('[hang]\nstack = "gdb"', ["hang.stack = 'gdb'",
                               "one of 'auto', 'py-spy', 'faulthandler', 'none'"]),
    ('[orphans]\naction = "ignore"', ["orphans.action = 'ignore'", "one of 'kill', 'report'"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BAD_FILES, ids=[t for t, _ in BAD_FILES])
def test_a_bad_file_is_refused_naming_key_value_and_form(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    """Every malformed file is refused with exit 2, before anything starts."""
    message = _refused(_write(tmp_path, text))
    for part in expected:
        assert part in message


def test_the_message_has_the_documented_form(tmp_path: Path) -> None:
    """key = repr(value), where it came from, then the expected form."""
    path = _write(tmp_path, "[memory]\nchild_soft_mib = -5\n")
    assert _refused(path) == (
        f"config: memory.child_soft_mib = -5 (in {path}): "
        "expected a number of MiB >= 0 (0 turns it off)"
    )


# --- good files ---

GOOD_FILES = [
    ("", GuardConfig()),
    ("[memory]\nchild_hard_mib = 1024", GuardConfig(memory=MemoryPolicy(child_hard_mib=1024.0))),
    # a dotted key at the top level is the same TOML as the section
    ("memory.child_hard_mib = 1024", GuardConfig(memory=MemoryPolicy(child_hard_mib=1024.0))),
    # the soft threshold alone, and the hard one alone
    ("[memory]\nchild_soft_mib = 800", GuardConfig(memory=MemoryPolicy(child_soft_mib=800.0))),
    (
        "[memory]\nchild_hard_mib = 900\nchild_soft_mib = 0\nprojected_horizon_seconds = 60",
        GuardConfig(memory=MemoryPolicy(child_hard_mib=900.0, projected_horizon_seconds=60.0)),
    ),
    # the lowest values each key accepts
    (
        "[recycle]\nmin_serving = 0\nmin_interval_seconds = 0\n[memory]\nhysteresis_mib = 0",
        GuardConfig(
            memory=MemoryPolicy(hysteresis_mib=0.0),
            recycle=RecyclePolicy(min_serving=0, min_interval_seconds=0.0),
        ),
    ),
    (
        "[hang]\nfactor = 1\ntime_limit_factor = 1\nmin_history = 1\nstack = 'none'",
        GuardConfig(
            hang=HangPolicy(factor=1.0, time_limit_factor=1.0, min_history=1, stack="none")
        ),
    ),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_FILES, ids=[t for t, _ in GOOD_FILES])
def test_a_good_file_loads(tmp_path: Path, text: str, expected: GuardConfig) -> None:
    """Keys left out keep their defaults; an int is fine where a float is expected."""
    assert load_config(_write(tmp_path, text)) == expected


def test_an_int_for_a_float_key_becomes_a_float(tmp_path: Path) -> None:
    """The policies see the type they declare, whatever TOML made of the number."""
    config = load_config(_write(tmp_path, "[recycle]\ngrace_seconds = 3\n"))
    assert type(config.recycle.grace_seconds) is float


def test_no_file_is_the_defaults() -> None:
    """Without a file, the defaults: run acts."""
    assert load_config(None) == GuardConfig()
    assert load_config(None).act


# --- files that cannot be used ---


def test_a_toml_syntax_error_names_the_file_and_the_place(tmp_path: Path) -> None:
    """TOML's own line and column, and the path, so the user can go there."""
    path = _write(tmp_path, "[memory]\nchild_hard_mib = = 3\n")
    message = _refused(path)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "line 2, column" in message


def test_an_integer_python_will_not_parse_is_a_toml_error(tmp_path: Path) -> None:
    """Python refuses integers of over 4300 digits; that is the file's fault, not a crash."""
    path = _write(tmp_path, "[poison]\nmax_kills = 1" + "0" * 5000 + "\n")
    assert f"{path} is not valid TOML" in _refused(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    """A --config that names no file is an error, not the defaults."""
    path = tmp_path / "nope.toml"
    message = _refused(path)
    assert f"cannot read {path}" in message
    assert "No such file" in message


def test_a_directory_is_refused(tmp_path: Path) -> None:
    """A path that cannot be read as a file is refused (even for root)."""
    assert f"cannot read {tmp_path}" in _refused(tmp_path)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """TOML is UTF-8; anything else is refused with the path."""
    path = _write(tmp_path, "")
    path.write_bytes(b"[memory]\n# caf\xe9\n")
    assert f"{path} is not UTF-8" in _refused(path)


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o666, "group and others"), (0o620, "its group"), (0o602, "others")],
)
def test_a_file_others_can_write_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    """Someone else could change what the warden kills: refused, with the fix."""
    path = _write(tmp_path, "[memory]\nchild_hard_mib = 1024\n", mode=mode)
    message = _refused(path)
    assert f"writable by {who}" in message
    assert f"mode {mode:04o}" in message
    assert "someone else could change what the warden kills" in message
    assert f"chmod go-w {path}" in message


def test_the_chmod_advice_quotes_an_odd_path(tmp_path: Path) -> None:
    """The command in the message can be pasted as it is."""
    directory = tmp_path / "my configs"
    directory.mkdir()
    path = _write(directory, "", mode=0o666)
    assert f"chmod go-w '{path}'" in _refused(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """Its owner could change it, even with no write bit for us to see."""
    path = _write(tmp_path, "", mode=0o644)
    os.chown(path, 65534, -1)
    message = _refused(path)
    assert "owned by uid 65534" in message
    assert "someone else could change what the warden kills" in message


def test_an_owner_only_file_is_accepted(tmp_path: Path) -> None:
    """Read-only for group and others is fine."""
    assert load_config(_write(tmp_path, "", mode=0o644)) == GuardConfig()


# --- flags over the file ---


def test_a_flag_overrides_the_file(tmp_path: Path) -> None:
    """Flags come last; keys neither sets keep the file's value."""
    path = _write(tmp_path, "[memory]\nchild_hard_mib = 2048\nsustain_samples = 4\n")
    config = load_config(path, {"memory.child_hard_mib": 4096, "recycle.max_parallel": 2})
    assert config.memory == MemoryPolicy(child_hard_mib=4096.0, sustain_samples=4)
    assert config.recycle.max_parallel == 2


def test_a_flag_not_given_is_skipped(tmp_path: Path) -> None:
    """None is what click gives for an option left out: the file's value stays."""
    path = _write(tmp_path, "[memory]\nchild_hard_mib = 2048\n")
    assert load_config(path, {"memory.child_hard_mib": None}).memory.child_hard_mib == 2048.0


def test_act_comes_from_the_flags_only() -> None:
    """The command passes act: run --dry-run and watch without --act pass False."""
    assert load_config(None, {"act": False}).act is False
    assert load_config(None, {"act": True}).act is True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"memory.child_hard_mib": -1},
            ["memory.child_hard_mib = -1 (from the command line)", "MiB >= 0"],
        ),
        (
            {"memory.child_hard_mib": float("nan")},
            ["memory.child_hard_mib = nan", "MiB >= 0"],
        ),
        (
            {"memory.child_hard_mb": 1},
            ["memory.child_hard_mb = 1", "did you mean 'child_hard_mib'?"],
        ),
        (
            {"memroy.child_hard_mib": 1},
            ["memroy.child_hard_mib = 1", "did you mean 'memory.child_hard_mib'?"],
        ),
        ({"act": 1}, ["act = 1 (from the command line)", "expected true or false"]),
        ({"hang.stack": "gdb"}, ["hang.stack = 'gdb'", "one of 'auto'"]),
    ],
)
def test_a_bad_flag_is_refused_like_a_bad_file(
    overrides: dict[str, object], expected: list[str]
) -> None:
    """Flags go through the same checks as the file's keys."""
    message = _refused(None, overrides)
    for part in expected:
        assert part in message


def test_the_rules_between_keys_apply_to_the_merged_config(tmp_path: Path) -> None:
    """A flag can break the file's soft < hard, or mend it."""
    path = _write(tmp_path, "[memory]\nchild_soft_mib = 1000\nchild_hard_mib = 2000\n")
    assert "less than memory.child_hard_mib = 500.0" in _refused(
        path, {"memory.child_hard_mib": 500}
    )
    broken = _write(tmp_path, "[memory]\nchild_soft_mib = 3000\nchild_hard_mib = 2000\n")
    config = load_config(broken, {"memory.child_soft_mib": 1500})
    assert config.memory.child_soft_mib == 1500.0


# --- --print-config ---


def test_every_field_is_changed() -> None:
    """CHANGED really moves every field, so the round trip below covers them all."""
    defaults = GuardConfig()
    for section in SECTIONS:
        changed, default = getattr(CHANGED, section), getattr(defaults, section)
        for f in fields(default):
            assert getattr(changed, f.name) != getattr(default, f.name), f"{section}.{f.name}"


@pytest.mark.parametrize(
    "config",
    [
        GuardConfig(),
        CHANGED,
        replace(CHANGED, act=False),
        GuardConfig(memory=MemoryPolicy(child_hard_mib=1024)),  # an int in a float field
    ],
    ids=["defaults", "every-field-changed", "dry-run", "int-for-float"],
)
def test_print_config_loads_back_to_the_same_config(tmp_path: Path, config: GuardConfig) -> None:
    """What --print-config writes is a config file that gives the same config, act aside."""
    loaded = load_config(_write(tmp_path, dump_config(config)))
    assert replace(loaded, act=config.act) == config


def test_print_config_writes_every_key_with_a_comment() -> None:
    """One section per policy, every key present, each with the line that explains it."""
    text = dump_config(GuardConfig())
    document = tomllib.loads(text)
    defaults = GuardConfig()
    assert list(document) == list(SECTIONS)
    for section in SECTIONS:
        assert list(document[section]) == [f.name for f in fields(getattr(defaults, section))]
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[number - 1].startswith("# "), line


@pytest.mark.parametrize(("act", "written"), [(True, "true"), (False, "false")])
def test_print_config_writes_act_as_a_comment(act: bool, written: str) -> None:
    """act is shown, but as a comment: the command sets it, a file may not."""
    text = dump_config(GuardConfig(act=act))
    assert f"# act = {written}  (set by the command: run acts, watch needs --act)" in text
    assert "act" not in tomllib.loads(text)


# --- $CELERY_WARDEN_CONFIG ---


def test_the_env_variable_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set: its path; unset or empty: no file."""
    monkeypatch.setenv(CONFIG_ENV, "/etc/celery-warden.toml")
    assert config_from_env_path() == Path("/etc/celery-warden.toml")
    monkeypatch.setenv(CONFIG_ENV, "")
    assert config_from_env_path() is None
    monkeypatch.delenv(CONFIG_ENV)
    assert config_from_env_path() is None
