"""The out-of-process sampler: one sweep reads every process of every watched tree.

A sweep (1) finds processes that appeared under the watched trees, (2) reads each
tracked process's ``/proc/PID/stat`` and fd count, (3) refreshes ``smaps_rollup``
(USS, PSS, swap, shared) and the peak RSS for a bounded number of them, stalest first,
and (4) records the end of every process that vanished. It returns records and keeps
no history: the store keeps that.

Processes come and go at any moment; a vanished process is an outcome recorded as a
:class:`ProcessEnd`, never an error.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery_warden import _procs
from celery_warden._argv import is_pool_title, is_worker_argv
from celery_warden._config import SamplerConfig
from celery_warden._records import EndReason, ProcessEnd, ProcessInfo, Role, Sample
from celery_warden.store import Record

__all__ = ["Sampler"]

log = logging.getLogger("celery_warden")

_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "disk-sleep",
    "Z": "zombie",
    "T": "stopped",
    "t": "tracing-stop",
    "X": "dead",
    "I": "idle",
}


def _describe_exit_status(status: int) -> tuple[EndReason, int]:
    """Turn a waitpid status into an end reason and an exit code (``-signum`` if killed)."""
    if os.WIFSIGNALED(status):
        return EndReason.KILLED, -os.WTERMSIG(status)
    return EndReason.EXITED, os.WEXITSTATUS(status)


@dataclass(slots=True)
class _Tracked:
    info: ProcessInfo
    argv: list[str]
    smaps_t: float = -math.inf
    smaps_rss_bytes: int = 0
    comm: str = ""
    confirmed: bool = False  # command line re-read once after adoption
    exit_status: int | None = None
    # A pidfd opened and verified at discovery: the only way the guard may signal it.
    handle: _procs.ProcessHandle | None = None


class Sampler:
    """Samples the trees below ``anchors``.

    An anchor is a process under which workers are looked for: in ``run`` the command
    the warden started (the worker itself, or a wrapper such as ``sh -c``), in
    ``watch`` each worker master found. The first Celery worker process at or below
    an anchor is its tree's master.
    """

    def __init__(
        self,
        config: SamplerConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or SamplerConfig()
        self._clock = clock
        # Processes under which workers are looked for, with their start ticks and the
        # ``comm`` they had when last looked at (None: not looked at yet): a wrapper that
        # execs the worker (`sh -c "exec celery ..."`, a container entrypoint) keeps its
        # PID and changes its comm.
        self._anchors: dict[int, tuple[int, str] | None] = {}
        self._tracked: dict[int, _Tracked] = {}
        self._seen_pids: set[int] = set()
        self._last_pid = -1
        self._last_scan = -math.inf
        self._force_scan = True
        self._retry: set[int] = set()  # PIDs whose identity changed mid-adoption

    # -- what is watched -------------------------------------------------------------

    def add_anchor(self, pid: int) -> None:
        """Watch the tree rooted at ``pid`` from the next sweep on."""
        self._anchors[pid] = None
        # Its descendants may already have been seen (and passed over) by earlier scans.
        self._seen_pids.clear()
        self._force_scan = True

    @property
    def tracked(self) -> list[ProcessInfo]:
        """The processes being sampled now."""
        return [t.info for t in self._tracked.values()]

    def masters(self) -> list[ProcessInfo]:
        """The worker masters being sampled now."""
        return [t.info for t in self._tracked.values() if t.info.role is Role.MASTER]

    def handle(self, pid: int, start_ticks: int) -> _procs.ProcessHandle | None:
        """A duplicate of the pidfd opened when ``(pid, start_ticks)`` was discovered,
        for the caller to close; None if that process is not tracked (never seen, ended,
        or its PID now names another process)."""
        tracked = self._tracked.get(pid)
        if tracked is None or tracked.handle is None or tracked.info.start_ticks != start_ticks:
            return None
        return _procs.ProcessHandle(pid, start_ticks, os.dup(tracked.handle.fd))

    # -- one sweep -------------------------------------------------------------------

    def sweep(self) -> list[Record]:
        """Read everything due now and return the records, in the order to store them."""
        now = self._clock()
        records: list[Record] = []
        if self._scan_due(now):
            self._discover(now, records)
        samples: list[tuple[_Tracked, _procs.Stat]] = []
        for pid, tracked in list(self._tracked.items()):
            stat = self._read_or_end(pid, tracked, now, records)
            if stat is not None:
                self._reclassify(tracked, stat, records)
                samples.append((tracked, stat))
        smaps_due = self._pick_smaps(now, samples)
        for tracked, stat in samples:
            records.append(self._sample(tracked, stat, now, tracked.info.pid in smaps_due))
        return records

    def _scan_due(self, now: float) -> bool:
        try:
            last = _procs.last_pid()
        except (_procs.Vanished, OSError):
            last = -1
        due = self._force_scan or last != self._last_pid
        due = due or now - self._last_scan >= self.config.rescan_seconds
        self._last_pid = last
        return due

    def _discover(self, now: float, records: list[Record]) -> None:
        """Add processes that appeared below an anchor or a tracked process.

        Only PIDs not seen in the previous scan cost a read, so a scan of a busy host
        is one ``listdir(/proc)`` plus a few reads.
        """
        self._force_scan = False
        self._last_scan = now
        self._recheck_anchors(now, records)
        pids = _procs.list_pids()
        fresh: dict[int, _procs.Stat] = {}
        own = os.getpid()  # the warden never samples itself: `install` starts it below a worker
        for pid in pids:
            if pid in self._seen_pids or pid in self._tracked or pid == own:
                continue
            try:
                fresh[pid] = _procs.read_stat(pid)
            except (_procs.Vanished, PermissionError):
                continue
        self._seen_pids = set(pids) - self._retry
        self._retry.clear()
        # Parents before children, by start time (PIDs wrap, start ticks do not).
        for stat in sorted(fresh.values(), key=lambda s: (s.start_ticks, s.pid)):
            if stat.pid in self._tracked:
                continue  # promoted from anchor to master just above
            if stat.pid in self._anchors:
                self._adopt(stat, None, now, records)
            elif stat.ppid in self._tracked:
                self._adopt(stat, self._tracked[stat.ppid], now, records)
            elif stat.ppid in self._anchors:
                self._adopt(stat, None, now, records)

    def _recheck_anchors(self, now: float, records: list[Record]) -> None:
        """Promote an anchor to worker master once it has exec'd into one."""
        for pid, seen in list(self._anchors.items()):
            if pid in self._tracked:
                continue
            try:
                stat = _procs.read_stat(pid)
            except (_procs.Vanished, PermissionError):
                del self._anchors[pid]
                continue
            if seen is not None:
                if stat.start_ticks != seen[0]:  # gone, its PID reused: not ours
                    del self._anchors[pid]
                    continue
                if stat.comm == seen[1]:
                    continue
            self._adopt(stat, None, now, records)

    def _adopt(
        self, stat: _procs.Stat, parent: _Tracked | None, now: float, records: list[Record]
    ) -> None:
        try:
            argv = _procs.read_cmdline(stat.pid)
        except (_procs.Vanished, PermissionError):
            return
        parent_argv = None
        if parent is None:
            if not is_worker_argv(argv) or is_pool_title(argv):
                # A wrapper (sh -c, a process manager): look for the worker below it,
                # and look at the wrapper again if it execs.
                self._anchors[stat.pid] = (stat.start_ticks, stat.comm)
                return
            role, master_pid = Role.MASTER, stat.pid
        elif parent.info.role is Role.MASTER and not argv:
            # Read in the instant after fork, before the kernel fills the command line
            # in: a pool child until the re-read of the next sweep says otherwise.
            role, master_pid, argv = Role.CHILD, parent.info.pid, parent.argv
            parent_argv = argv
        elif parent.info.role is Role.MASTER and (argv == parent.argv or is_pool_title(argv)):
            # A pool child is forked without exec: same command line as its master.
            role, master_pid = Role.CHILD, parent.info.pid
        else:
            role, master_pid = Role.DESCENDANT, parent.info.master_pid
        try:
            # Compared with what was just read with nothing but the PID; `argv` may be
            # the master's (read in the instant after fork): then the start time alone.
            seen = _procs.read_cmdline(stat.pid) if argv is parent_argv else argv
            handle = _procs.open_verified(stat.pid, stat.start_ticks, seen)
        except (_procs.Vanished, ValueError):
            return
        except OSError as exc:  # EMFILE, or pidfd_open refused (seccomp): try again later
            log.warning("cannot open a pidfd on PID %d (%s); retried", stat.pid, exc)
            self._retry.add(stat.pid)
            self._force_scan = True
            return
        except _procs.IdentityMismatch as exc:
            log.warning("identity_mismatch: %s; not adopted", exc)
            self._retry.add(stat.pid)
            self._force_scan = True
            return
        info = ProcessInfo(
            pid=stat.pid,
            start_ticks=stat.start_ticks,
            ppid=stat.ppid,
            role=role,
            started_at=_procs.start_epoch(stat.start_ticks),
            cmdline=" ".join(argv)[:1000],
            master_pid=master_pid,
        )
        self._tracked[stat.pid] = _Tracked(info=info, argv=argv, comm=stat.comm, handle=handle)
        records.append(info)

    def _reclassify(self, tracked: _Tracked, stat: _procs.Stat, records: list[Record]) -> None:
        """Re-read the command line once after adoption and after every exec.

        A process adopted between its fork and its exec shows its parent's command line;
        and a pool child that execs something else (``os.execv`` in a task) is no longer
        a pool child but a foreign process in the tree (RELIABILITY.md, A4). An exec
        changes ``comm``, which every sweep reads anyway, so this costs one read per
        process plus one per exec.
        """
        if tracked.confirmed and stat.comm == tracked.comm:
            return
        tracked.confirmed, tracked.comm = True, stat.comm
        if stat.state == "Z":
            return
        try:
            argv = _procs.read_cmdline(stat.pid)
        except (_procs.Vanished, PermissionError):
            return
        if argv == tracked.argv:
            return
        info = tracked.info
        role = info.role
        if role is Role.CHILD and not is_pool_title(argv):
            role = Role.DESCENDANT
        tracked.argv = argv
        tracked.info = ProcessInfo(
            pid=info.pid,
            start_ticks=info.start_ticks,
            ppid=info.ppid,
            role=role,
            started_at=info.started_at,
            cmdline=" ".join(argv)[:1000],
            master_pid=info.master_pid,
        )
        records.append(tracked.info)

    def _read_or_end(
        self, pid: int, tracked: _Tracked, now: float, records: list[Record]
    ) -> _procs.Stat | None:
        try:
            stat = _procs.read_stat(pid)
        except _procs.Vanished:
            self._end(tracked, now, records)
            return None
        if stat.start_ticks != tracked.info.start_ticks:
            # The PID was reused: ours ended, the newcomer is looked at by the next scan.
            self._end(tracked, now, records)
            self._seen_pids.discard(pid)
            self._force_scan = True
            return None
        return stat

    def _end(self, tracked: _Tracked, now: float, records: list[Record]) -> None:
        del self._tracked[tracked.info.pid]
        if tracked.handle is not None:
            tracked.handle.close()
        reason, code = EndReason.GONE, None
        if tracked.exit_status is not None:
            reason, code = _describe_exit_status(tracked.exit_status)
        records.append(ProcessEnd(tracked.info.pid, tracked.info.start_ticks, now, reason, code))
        self._force_scan = True  # its replacement is probably there already

    def _pick_smaps(self, now: float, samples: list[tuple[_Tracked, _procs.Stat]]) -> set[int]:
        """Pick which processes get the costly smaps read this sweep.

        Enough to refresh every process within ``smaps_max_age_seconds``, stalest first,
        with processes whose RSS moved a lot since their last read put ahead.
        """
        cfg = self.config
        live = [(t, s) for t, s in samples if s.state != "Z"]
        if not live:
            return set()
        per_sweep = max(
            cfg.smaps_min_per_sweep,
            math.ceil(len(live) * cfg.interval_seconds / cfg.smaps_max_age_seconds),
        )

        def urgency(item: tuple[_Tracked, _procs.Stat]) -> float:
            tracked, stat = item
            age = now - tracked.smaps_t
            moved = abs(stat.rss_bytes - tracked.smaps_rss_bytes)
            if moved > cfg.smaps_rss_change_fraction * max(tracked.smaps_rss_bytes, 1):
                age += cfg.smaps_max_age_seconds
            return age

        due = [item for item in live if urgency(item) >= cfg.smaps_max_age_seconds]
        due.sort(key=urgency, reverse=True)
        return {tracked.info.pid for tracked, _ in due[:per_sweep]}

    def _sample(self, tracked: _Tracked, stat: _procs.Stat, now: float, with_smaps: bool) -> Sample:
        """Read what the stat line does not hold. A process that is exiting loses its
        fd table and mappings before it turns zombie: such a figure is recorded as
        missing (``gone``), and only ``/proc/PID/stat`` decides that a process ended."""
        pid = tracked.info.pid
        missing: list[str] = []
        if stat.state == "Z":
            # A zombie holds no memory and no files; its exit status is readable now,
            # before its parent reaps it, so keep it for the end record.
            tracked.exit_status = stat.exit_status
            return Sample(pid, stat.start_ticks, now, "zombie", 0, 0.0, 0.0, 0)
        fds: int | None = None
        try:
            fds = _procs.count_open_fds(pid)
        except PermissionError:
            missing.append("open_fds:permission")
        except _procs.Vanished:
            missing.append("open_fds:gone")
        smaps: _procs.Smaps | None = None
        peak: int | None = None
        if with_smaps:
            try:
                smaps = _procs.read_smaps(pid)
                peak = _procs.read_peak_rss(pid)
            except PermissionError:
                missing.append("smaps:permission")
            except _procs.Vanished:
                missing.append("smaps:gone")
            tracked.smaps_t, tracked.smaps_rss_bytes = now, stat.rss_bytes
        return Sample(
            pid=pid,
            start_ticks=stat.start_ticks,
            t=now,
            state=_STATES.get(stat.state, stat.state),
            rss_bytes=stat.rss_bytes,
            cpu_user_seconds=stat.cpu_user_seconds,
            cpu_system_seconds=stat.cpu_system_seconds,
            threads=stat.threads,
            open_fds=fds,
            uss_bytes=smaps.uss_bytes if smaps else None,
            pss_bytes=smaps.pss_bytes if smaps else None,
            swap_bytes=smaps.swap_bytes if smaps else None,
            shared_bytes=smaps.shared_bytes if smaps else None,
            rss_peak_bytes=peak,
            missing=tuple(missing),
        )

    def end_all(self, reason: EndReason = EndReason.UNKNOWN) -> list[Record]:
        """End every tracked process (the warden stops watching them)."""
        now = self._clock()
        records: list[Record] = []
        for tracked in list(self._tracked.values()):
            try:
                alive = _procs.read_stat(tracked.info.pid).start_ticks == tracked.info.start_ticks
            except _procs.Vanished:
                alive = False
            end_reason = reason if alive else EndReason.GONE
            del self._tracked[tracked.info.pid]
            if tracked.handle is not None:
                tracked.handle.close()
            records.append(
                ProcessEnd(tracked.info.pid, tracked.info.start_ticks, now, end_reason, None)
            )
        return records
