"""The store's schema, versioned with ``PRAGMA user_version``, and its forward migrations.

A migration is a list of statements that takes the schema from version N-1 to N; they
run in one transaction, so a store is never left half-migrated. Never edit a released
migration: add the next one.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_V1 = [
    """CREATE TABLE sessions (
        id INTEGER PRIMARY KEY,
        mode TEXT NOT NULL,               -- run | watch | demo
        command TEXT NOT NULL,
        hostname TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        warden_pid INTEGER NOT NULL,
        interval_seconds REAL NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        exit_code INTEGER,
        probe_dropped INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE workers (
        session_id INTEGER NOT NULL REFERENCES sessions(id),
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        nodename TEXT NOT NULL,
        pool TEXT NOT NULL,
        concurrency INTEGER NOT NULL,
        max_tasks_per_child INTEGER,
        max_memory_per_child_kb INTEGER,
        PRIMARY KEY (session_id, pid, start_ticks)
    )""",
    """CREATE TABLE processes (
        id INTEGER PRIMARY KEY,
        session_id INTEGER NOT NULL REFERENCES sessions(id),
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        ppid INTEGER NOT NULL,
        master_pid INTEGER NOT NULL,
        role TEXT NOT NULL,               -- master | child | descendant
        cmdline TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        end_reason TEXT,
        exit_code INTEGER,
        UNIQUE (session_id, pid, start_ticks)
    )""",
    # resolution_seconds is 0 for raw samples, else the width of an aggregate's bucket.
    """CREATE TABLE samples (
        process_id INTEGER NOT NULL REFERENCES processes(id),
        t REAL NOT NULL,
        resolution_seconds REAL NOT NULL DEFAULT 0,
        state TEXT,
        rss_bytes INTEGER,
        rss_peak_bytes INTEGER,
        cpu_user_seconds REAL,
        cpu_system_seconds REAL,
        threads INTEGER,
        open_fds INTEGER,
        uss_bytes INTEGER,
        pss_bytes INTEGER,
        swap_bytes INTEGER,
        shared_bytes INTEGER,
        missing TEXT
    )""",
    "CREATE INDEX samples_by_process ON samples (process_id, t)",
    "CREATE INDEX samples_by_age ON samples (resolution_seconds, t)",
    """CREATE TABLE tasks (
        id INTEGER PRIMARY KEY,
        session_id INTEGER NOT NULL REFERENCES sessions(id),
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        task_id TEXT NOT NULL,
        name TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        wall_seconds REAL,
        state TEXT NOT NULL,
        rss_after_bytes INTEGER,
        UNIQUE (session_id, pid, start_ticks, task_id, started_at)
    )""",
    "CREATE INDEX tasks_by_process ON tasks (session_id, pid, start_ticks, ended_at)",
    "CREATE INDEX tasks_by_age ON tasks (started_at)",
]

# v2: what the probe records per call beyond wall time and RSS (issue 3).
_V2 = [
    "ALTER TABLE tasks ADD COLUMN cpu_seconds REAL",  # the CPU of the thread that ran it
    "ALTER TABLE tasks ADD COLUMN uss_after_bytes INTEGER",  # read at a bounded rate
    "ALTER TABLE tasks ADD COLUMN pss_after_bytes INTEGER",
    "ALTER TABLE tasks ADD COLUMN py_blocks_delta INTEGER",  # sys.getallocatedblocks() change
    "ALTER TABLE tasks ADD COLUMN exception TEXT",  # the exception type of a failed call
    "ALTER TABLE tasks ADD COLUMN retries INTEGER NOT NULL DEFAULT 0",
]

# v3: what `celery-warden diagnose` found in a live process (issue 4). The document is
# the probe's replies merged (JSON): types, sizes, counts, file:line and attribute
# names, never object contents unless show_values says the user asked for them.
_V3 = [
    """CREATE TABLE diagnoses (
        id INTEGER PRIMARY KEY,
        session_id INTEGER REFERENCES sessions(id),  -- NULL: no recorded session has it
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        at REAL NOT NULL,
        task_name TEXT,                   -- the name traced, if one was
        verdict TEXT NOT NULL,
        show_values INTEGER NOT NULL DEFAULT 0,
        document TEXT NOT NULL
    )""",
    "CREATE INDEX diagnoses_by_session ON diagnoses (session_id, at)",
]

# v4: what the guard decided and every signal it sent (or refused, or would have sent).
# An incident is keyed by its own id because the guard writes it twice: when decided,
# before any signal, and again when its outcome is known; a warden restarted while
# one is pending finds it by outcome. session_id is NULL for a guard no session records.
_V4 = [
    """CREATE TABLE incidents (
        id TEXT PRIMARY KEY,              -- Incident.id, stable across its updates
        session_id INTEGER REFERENCES sessions(id),
        kind TEXT NOT NULL,               -- memory-soft | memory-hard | hang | ...
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        master_pid INTEGER,
        t REAL NOT NULL,                  -- when decided
        reason TEXT NOT NULL,
        numbers TEXT NOT NULL,            -- JSON object: the measurements behind it
        outcome TEXT NOT NULL,            -- dry-run | pending | recycled | killed | ...
        dry_run INTEGER NOT NULL DEFAULT 0,
        task_name TEXT,
        task_id TEXT,
        stack TEXT,
        ended_at REAL,                    -- when the outcome was known
        deadline REAL                     -- when a pending hard recycle sends KILL
    )""",
    "CREATE INDEX incidents_by_session ON incidents (session_id, t)",
    "CREATE INDEX incidents_by_outcome ON incidents (outcome)",
    """CREATE TABLE signals (
        id INTEGER PRIMARY KEY,
        session_id INTEGER REFERENCES sessions(id),
        t REAL NOT NULL,
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        signal TEXT NOT NULL,             -- SIGTERM, SIGKILL, ...
        result TEXT NOT NULL,             -- sent | gone | dry-run | refused: <why>
        incident_id TEXT,
        detail TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX signals_by_session ON signals (session_id, t)",
]

# MIGRATIONS[i] takes the schema from version i to version i + 1.
MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4]
SCHEMA_VERSION = len(MIGRATIONS)
