"""Probe cost: what the in-worker probe costs a real worker, per task, and in memory.

Three measurements, in one run:

1. **Throughput** of a real Celery prefork worker (2 children, Redis broker, a queue of
   its own, a task that returns at once, ``task_ignore_result``, prefetch multiplier
   ``--prefetch``, ``--without-gossip --without-mingle --without-heartbeat``) under
   these variants: (a) no probe; (b) the probe, attached exactly as ``celery-warden
   run`` does it: a :class:`~celery_warden.session.Session` with a store in a temporary
   directory is started in this process, the worker gets ``session.probe_environment()``
   (a ``sitecustomize`` on ``PYTHONPATH``) and its PID is anchored, so the warden samples
   the tree and stores every task meanwhile; (c) ``PYTHONTRACEMALLOC=1`` (tracemalloc at
   1 frame), no probe, with a fifth of the tasks (it is that much slower); (d) Celery's
   own ``--max-memory-per-child`` set so high it never recycles (billiard then reads
   ``getrusage`` after every task); (b0) the probe attached the same way but its socket
   only read by another process, no warden: (b) minus the warden's own CPU, which runs
   on the same 2 cores. Each round queues ``--warmup`` tasks, a start marker,
   ``--tasks`` tasks and an end marker before the worker starts; the markers are tasks
   that store ``time.time()`` in Redis, so tasks/s is the task count over the time from
   the start marker's run to the end marker's, and nothing is counted per task. The
   messages are the bytes ``send_task`` publishes, copied with a fresh task id and
   delivery tag each. The variants are interleaved (a, b, c, d, b0, a, ...) for
   ``--rounds`` rounds; each figure is the median over rounds. CPU between the markers
   is shown per task for the master, the children (psutil) and this process (the
   warden's threads in (b); only the polling of Redis otherwise). Last, one worker with
   the probe runs a task that times the probe inside its pool child (its real heap and
   Celery's ``Signal.send``).
2. **CPU per task** of ``Probe.on_task_prerun`` + ``on_task_postrun`` called in a loop
   (``heartbeat_seconds=0``, a fake task with ``.name`` and ``.request.retries``, the
   messages sent to a real listening unix socket) beside a bare loop, ``open`` +
   ``read`` of ``/proc/self/statm``, billiard's ``mem_rss`` (``getrusage``, what
   ``--max-memory-per-child`` adds) and the probe loop again with tracemalloc at 1
   frame, with the socket read by a thread of this process instead of another process
   (the GIL then costs the loop), and with the heap grown to a worker's size. CPU is
   the loop thread's (``time.thread_time``), beside ``time.process_time``. Then each
   step of the two receivers is timed alone, to say where the time goes.
3. **Memory**: ``--mem-tasks`` tasks over 1,000 task names through a Probe, 1% of them
   started and never finished (a lost postrun), with the warden absent (a socket path
   nobody listens on) and present; at checkpoints, the entries of the probe's table of
   running tasks, its size (``sys.getsizeof`` of the table, keys, lists and values) and
   Python's allocated blocks since the probe was made.

Run: ``python bench/bench_probe.py`` (about 5 minutes; ``--help`` for the options).
Redis must listen on 127.0.0.1:6379; the benchmark uses database 13 (``--broker``)
and deletes only its own keys.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from _util import describe_machine, load_average, print_table
from celery_warden.probe import wire
from celery_warden.probe._boot import PACKAGE_ENV, SOCKET_ENV
from celery_warden.probe._channel import Channel
from celery_warden.probe._hooks import BLOCKS_SAMPLE, Probe, _quote
from celery_warden.session import Session
from celery_warden.store import Store

TARGET_THROUGHPUT = 0.97  # the probe keeps this share of the no-probe throughput
TARGET_CPU_US = 25.0  # the probe's CPU per task (prerun + postrun), microseconds
PACKAGE_DIR = str(Path(sys.modules["celery_warden"].__file__ or "").parent)
APP_MODULE = "warden_benchprobe"

# The worker's app: a task that returns at once and a marker that stores the time.
_APP = """\
import os
import time

from celery import Celery

app = Celery("warden_benchprobe", broker=os.environ["WARDEN_BENCH_BROKER"])
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=int(os.environ["WARDEN_BENCH_PREFETCH"]),
)


@app.task(name="bench.noop")
def noop():
    return None


@app.task(name="bench.mark")
def mark(key):
    import redis

    redis.Redis.from_url(os.environ["WARDEN_BENCH_BROKER"]).set(key, repr(time.time()))


@app.task(name="bench.probe_cost")
def probe_cost(key, n):
    # Time the probe inside this pool child: its heap, its socket, Celery's signals.
    import json
    import sys

    import redis
    from celery import signals
    from celery_warden.probe import _hooks

    probe, task, ids = _hooks._probe, noop, [f"{i:036d}" for i in range(n)]
    pre, post = probe.on_task_prerun, probe.on_task_postrun
    send_pre, send_post = signals.task_prerun.send, signals.task_postrun.send
    blocks = sys.getallocatedblocks

    def direct():
        for tid in ids:
            pre(signal=None, sender=task, task_id=tid, task=task, args=(), kwargs={})
            post(signal=None, sender=task, task_id=tid, task=task, retval=None, state="SUCCESS")

    def through_signals():
        for tid in ids:
            send_pre(sender=task, task_id=tid, task=task, args=(), kwargs={})
            send_post(sender=task, task_id=tid, task=task, retval=None, state="SUCCESS")

    def block_counts():
        for _ in ids:
            blocks()
            blocks()

    def per_task(loop):
        t0 = time.thread_time()
        loop()
        return (time.thread_time() - t0) / n * 1e6

    out = {"blocks": blocks(), "dropped_before": probe.channel.dropped}
    out["direct"] = per_task(direct)
    out["signals"] = per_task(through_signals)
    out["getallocatedblocks"] = per_task(block_counts)
    out["dropped"] = probe.channel.dropped - out["dropped_before"]
    redis.Redis.from_url(os.environ["WARDEN_BENCH_BROKER"]).set(key, json.dumps(out))
"""


# -- 1. throughput of a real worker --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    key: str
    label: str
    probe: str = ""  # "warden": a Session collects; "drain": a process only reads the socket
    env: tuple[tuple[str, str], ...] = ()
    argv: tuple[str, ...] = ()
    task_share: float = 1.0  # of --tasks: tracemalloc is 5 times slower


VARIANTS = (
    Variant("none", "(a) no probe"),
    Variant("probe", "(b) probe, warden collecting", probe="warden"),
    Variant(
        "tracemalloc",
        "(c) PYTHONTRACEMALLOC=1, no probe",
        env=(("PYTHONTRACEMALLOC", "1"),),
        task_share=0.2,
    ),
    Variant(
        "maxmem",
        "(d) --max-memory-per-child=10000000",
        argv=("--max-memory-per-child", "10000000"),
    ),
    Variant("drain", "(b0) probe, socket only read (no warden)", probe="drain"),
)


@dataclass(frozen=True, slots=True)
class Round:
    """One worker run between the two markers."""

    tasks_per_second: float
    seconds: float
    master_cpu_us: float  # the worker master's CPU per task
    children_cpu_us: float  # the pool children's, together
    bench_cpu_us: float  # this process's CPU per task: the warden in (b), polling only else
    recorded: int  # tasks the warden stored (b only)
    dropped: int  # messages the probes said they dropped (b only)


class Broker:
    """The Redis side: fills the queue with copies of real Celery messages."""

    def __init__(self, url: str, queue: str) -> None:
        import redis
        from celery import Celery

        self.url, self.queue = url, queue
        self.redis = redis.Redis.from_url(url)
        self.redis.ping()
        self.app = Celery("warden-bench-producer", broker=url)
        self._noop = self._capture("bench.noop", ())

    def _capture(self, name: str, args: tuple[object, ...]) -> tuple[bytes, bytes, bytes]:
        """The bytes ``send_task`` pushes for one call, with its task id and tag."""
        scratch = f"{self.queue}.scratch"
        result = self.app.send_task(name, args=args, queue=scratch)
        raw = self.redis.rpop(scratch)
        self.clean()
        assert isinstance(raw, bytes)
        import json

        tag = json.loads(raw)["properties"]["delivery_tag"]
        return raw, str(result.id).encode(), str(tag).encode()

    def _noops(self, count: int) -> None:
        raw, task_id, tag = self._noop
        pipe = self.redis.pipeline(transaction=False)
        for i in range(count):
            fresh = raw.replace(task_id, str(uuid.uuid4()).encode())
            pipe.lpush(self.queue, fresh.replace(tag, str(uuid.uuid4()).encode()))
            if i % 2000 == 1999:
                pipe.execute()
        pipe.execute()

    def fill(self, warmup: int, tasks: int, start_key: str, end_key: str) -> None:
        """Queue: warm-up tasks, the start marker, the measured tasks, the end marker
        (kombu's Redis transport pushes with LPUSH and pops with BRPOP: FIFO)."""
        self.redis.delete(self.queue, start_key, end_key)
        self._noops(warmup)
        self.app.send_task("bench.mark", args=(start_key,), queue=self.queue)
        self._noops(tasks)
        self.app.send_task("bench.mark", args=(end_key,), queue=self.queue)

    def marker(self, key: str) -> float | None:
        value = self.redis.get(key)
        return None if value is None else float(value)

    def clean(self, *keys: str) -> None:
        """Delete the queue, kombu's records of it, and ``keys``; nothing else."""
        names = [f"{self.queue}", f"{self.queue}.scratch"]
        bindings = [f"_kombu.binding{kind}.{q}" for q in names for kind in ("", "_permanent")]
        self.redis.delete(*names, *bindings, *keys)

    def close(self) -> None:
        self.clean()
        self.app.close()
        self.redis.close()


def _tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of a worker master, and of its live children."""
    try:
        master = psutil.Process(pid)
        children = master.children(recursive=True)
        t = master.cpu_times()
    except psutil.NoSuchProcess:
        return float("nan"), float("nan")
    total = 0.0
    for p in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            c = p.cpu_times()
            total += c.user + c.system
    return t.user + t.system, total


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, then SIGKILL to the worker's whole process group, then reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's session: master and children
    proc.wait()


def _wait_for(broker: Broker, key: str, proc: subprocess.Popen[bytes], deadline: float) -> float:
    while True:
        value = broker.marker(key)
        if value is not None:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode} before {key}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {key} within the time allowed; is the worker stuck?")
        time.sleep(0.02)


def _probe_env(env: dict[str, str], socket_path: str) -> dict[str, str]:
    """What ``Session.probe_environment()`` adds, pointed at another socket."""
    from celery_warden.probe import SITE_DIR

    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE_DIR), env.get("PYTHONPATH")]))
    env[SOCKET_ENV], env[PACKAGE_ENV] = socket_path, PACKAGE_DIR
    return env


def _worker_argv(queue: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", APP_MODULE, "worker", "--pool", "prefork",
        "-c", "2", "-Q", queue, "-n", f"{queue}@%h", "-l", "warning",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *extra,
    ]  # fmt: skip


def _worker_env(env: dict[str, str], tmp: Path, args: argparse.Namespace) -> dict[str, str]:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(tmp)]))
    env.update(WARDEN_BENCH_BROKER=args.broker, WARDEN_BENCH_PREFETCH=str(args.prefetch))
    return env


@contextlib.contextmanager
def running_worker(
    argv: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker in its own session; stopped and reaped on exit, its log shown on error."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    except BaseException:
        sys.stderr.write(log_path.read_text()[-3000:])
        raise
    finally:
        _stop_worker(proc)


def run_round(
    variant: Variant, broker: Broker, tmp: Path, args: argparse.Namespace, index: int
) -> Round:
    """Start a worker for ``variant``, let it run the queued tasks, stop it."""
    start_key = f"{broker.queue}.start.{index}"
    end_key = f"{broker.queue}.end.{index}"
    tasks = max(1, round(args.tasks * variant.task_share))
    broker.fill(args.warmup, tasks, start_key, end_key)
    argv = _worker_argv(broker.queue, *variant.argv)
    env = {k: v for k, v in os.environ.items() if k not in (SOCKET_ENV, PACKAGE_ENV)}
    session = None
    with contextlib.ExitStack() as stack:
        stack.callback(broker.clean, start_key, end_key)
        if variant.probe == "warden":
            # What `celery-warden run` does: a session, its environment, the anchor.
            store = Store.open(tmp / f"store-{index}.db")
            stack.callback(store.close)
            session = Session(store, mode="run", command=" ".join(argv))
            session.start()
            stack.callback(session.stop, exit_code=0)  # after the worker has stopped
            env = session.probe_environment()
        elif variant.probe == "drain":
            env = _probe_env(env, stack.enter_context(drained_socket()))
        env = _worker_env(env, tmp, args)
        env.update(variant.env)
        proc = stack.enter_context(running_worker(argv, env, tmp / f"worker-{index}.log"))
        if session is not None:
            session.add_anchor(proc.pid)
        deadline = time.monotonic() + args.timeout
        t_start = _wait_for(broker, start_key, proc, deadline)
        cpu_start, bench_start = _tree_cpu_seconds(proc.pid), time.process_time()
        t_end = _wait_for(broker, end_key, proc, deadline)
        cpu_end, bench_end = _tree_cpu_seconds(proc.pid), time.process_time()
    seconds = t_end - t_start
    listener = session.listener if session is not None else None
    return Round(
        tasks_per_second=tasks / seconds,
        seconds=seconds,
        master_cpu_us=(cpu_end[0] - cpu_start[0]) / tasks * 1e6,
        children_cpu_us=(cpu_end[1] - cpu_start[1]) / tasks * 1e6,
        bench_cpu_us=(bench_end - bench_start) / tasks * 1e6,
        recorded=session.tasks_finished if session is not None else 0,
        dropped=listener.dropped_by_probes if listener is not None else 0,
    )


def measure_in_worker(broker: Broker, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    """Time the probe inside a pool child of a real worker (task ``bench.probe_cost``)."""
    key = f"{broker.queue}.probe_cost"
    env = {k: v for k, v in os.environ.items() if k not in (SOCKET_ENV, PACKAGE_ENV)}
    with contextlib.ExitStack() as stack:
        stack.callback(broker.clean, key)
        env = _worker_env(_probe_env(env, stack.enter_context(drained_socket())), tmp, args)
        broker.redis.delete(broker.queue, key)
        calls = args.cpu_tasks // 5
        broker.app.send_task("bench.probe_cost", args=(key, calls), queue=broker.queue)
        argv = _worker_argv(broker.queue)
        proc = stack.enter_context(running_worker(argv, env, tmp / "worker-probe-cost.log"))
        deadline = time.monotonic() + args.timeout
        while (raw := broker.redis.get(key)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the probe_cost task did not report; see the log above")
            time.sleep(0.05)
    import json

    result: dict[str, float] = json.loads(raw)
    return result


def measure_throughput(
    args: argparse.Namespace,
) -> tuple[dict[str, list[Round]], dict[str, float]]:
    """Every variant, interleaved, ``args.rounds`` times; then the probe in a child."""
    variants = [v for v in VARIANTS if v.key in args.variants.split(",")]
    results: dict[str, list[Round]] = {v.key: [] for v in variants}
    queue = f"warden-bench-probe-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / f"{APP_MODULE}.py").write_text(_APP)
        broker = Broker(args.broker, queue)
        try:
            index = 0
            for r in range(args.rounds):
                for variant in variants:
                    index += 1
                    one = run_round(variant, broker, tmp, args, index)
                    results[variant.key].append(one)
                    print(
                        f"  round {r + 1} {variant.label}: {one.tasks_per_second:,.0f} tasks/s "
                        f"({one.seconds:.1f} s; CPU/task master {one.master_cpu_us:.0f} us, "
                        f"children {one.children_cpu_us:.0f} us, "
                        f"this process {one.bench_cpu_us:.0f} us)",
                        flush=True,
                    )
            in_worker = measure_in_worker(broker, tmp, args)
        finally:
            broker.close()
    return results, in_worker


def report_throughput(results: dict[str, list[Round]], args: argparse.Namespace) -> float:
    """Print the table; return the probe's median share of the no-probe throughput."""
    base = statistics.median(r.tasks_per_second for r in results["none"])
    rows = []
    for variant in VARIANTS:
        if variant.key not in results:
            continue
        rounds = results[variant.key]
        rates = [r.tasks_per_second for r in rounds]
        med = statistics.median(rates)
        warden = variant.probe == "warden"
        rows.append(
            (
                variant.label,
                f"{med / base:.3f}",
                f"{med:,.0f}",
                f"{min(rates):,.0f}-{max(rates):,.0f}",
                f"{statistics.median(r.master_cpu_us for r in rounds):.0f} us",
                f"{statistics.median(r.children_cpu_us for r in rounds):.0f} us",
                f"{statistics.median(r.bench_cpu_us for r in rounds):.0f} us",
                f"{min(r.recorded for r in rounds):,}" if warden else "-",
                f"{max(r.dropped for r in rounds):,}" if warden else "-",
            )
        )
    print_table(
        f"Probe: throughput of a prefork worker, 2 children, Redis, trivial tasks "
        f"(median of {args.rounds} interleaved rounds)",
        [
            "variant",
            "vs (a)",
            "tasks/s",
            "range",
            "master CPU / task",
            "children CPU / task",
            "warden CPU / task",
            "tasks stored (min)",
            "probe drops (max)",
        ],
        rows,
    )
    if "probe" not in results:
        return float("nan")
    # The same ratio round by round: each (b) against the (a) run just before it.
    paired = [
        b.tasks_per_second / a.tasks_per_second
        for a, b in zip(results["none"], results["probe"], strict=True)
    ]
    print("(b) / (a) round by round: " + ", ".join(f"{p:.3f}" for p in paired))
    return statistics.median(r.tasks_per_second for r in results["probe"]) / base


def report_in_worker(found: dict[str, float]) -> None:
    print_table(
        "Probe: inside a pool child of a real worker (thread CPU per task)",
        ["what", "cost"],
        [
            ("on_task_prerun + on_task_postrun, called directly", f"{found['direct']:.1f} us"),
            ("the same through Celery's Signal.send (both signals)", f"{found['signals']:.1f} us"),
            ("of which sys.getallocatedblocks() x2", f"{found['getallocatedblocks']:.1f} us"),
            ("the child's heap (sys.getallocatedblocks())", f"{found['blocks']:,.0f} blocks"),
            ("messages dropped meanwhile", f"{found['dropped']:,.0f}"),
        ],
    )


# -- 2. CPU per task -----------------------------------------------------------------


class _Request:
    __slots__ = ("retries",)

    def __init__(self) -> None:
        self.retries = 0


class FakeTask:
    """What the receivers read of a Celery task: its name and request.retries."""

    __slots__ = ("name", "request")

    def __init__(self, name: str) -> None:
        self.name = name
        self.request = _Request()


_DRAIN = """\
import selectors, socket, sys

server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(64)
server.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(server, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is server:
            conn, _ = server.accept()
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            continue
        try:
            data = key.fileobj.recv(262144)
        except BlockingIOError:
            continue
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""


class ThreadDrain:
    """A thread of this process that reads and discards every connection on ``path``."""

    def __init__(self, path: str) -> None:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(16)
        self._server.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-drain", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._server:
                    conn, _ = self._server.accept()
                    conn.setblocking(False)
                    self._selector.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(256 * 1024)
                except BlockingIOError:
                    continue
                if not data:
                    self._selector.unregister(sock)
                    sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


@contextlib.contextmanager
def drained_socket(in_thread: bool = False) -> Iterator[str]:
    """The path of a listening unix socket whose messages are read and discarded: by
    another process (as the warden reads them), or by a thread of this one."""
    with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp:
        path = os.path.join(tmp, "probe.sock")
        if in_thread:
            drain = ThreadDrain(path)
            try:
                yield path
            finally:
                drain.close()
            return
        argv = [sys.executable, "-c", _DRAIN, path]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the drain process did not start (exit {proc.poll()})")
            yield path
        finally:
            proc.kill()
            proc.wait()


_IDS = [str(uuid.uuid4()) for _ in range(4096)]
_MASK = len(_IDS) - 1


def loop_bare(n: int, task: FakeTask, probe: Probe) -> None:
    ids = _IDS
    for i in range(n):
        ids[i & _MASK]


def loop_statm(n: int, task: FakeTask, probe: Probe) -> None:
    ids = _IDS
    for i in range(n):
        ids[i & _MASK]
        with open("/proc/self/statm", "rb") as f:
            f.read()


def loop_getrusage(n: int, task: FakeTask, probe: Probe) -> None:
    from billiard.compat import mem_rss

    ids = _IDS
    for i in range(n):
        ids[i & _MASK]
        mem_rss()


def loop_probe(n: int, task: FakeTask, probe: Probe) -> None:
    """The receivers, called as Celery's ``Signal.send`` calls them."""
    ids = _IDS
    pre, post = probe.on_task_prerun, probe.on_task_postrun
    args: tuple[object, ...] = ()
    kwargs: dict[str, object] = {}
    for i in range(n):
        tid = ids[i & _MASK]
        pre(signal=None, sender=task, task_id=tid, task=task, args=args, kwargs=kwargs)
        post(
            signal=None,
            sender=task,
            task_id=tid,
            task=task,
            args=args,
            kwargs=kwargs,
            retval=None,
            state="SUCCESS",
        )


@dataclass(slots=True)
class CpuResult:
    label: str
    thread_us: list[float] = field(default_factory=list)
    process_us: list[float] = field(default_factory=list)
    dropped: int = 0


def grow_heap(blocks: int) -> list[object]:
    """Small objects enough for Python's allocator to hold ``blocks`` blocks in all
    (``sys.getallocatedblocks`` walks every pool, so its cost grows with the heap)."""
    filler: list[object] = []
    while sys.getallocatedblocks() < blocks:
        filler.extend([(i,) for i in range(1000, 11_000)])  # two blocks each: tuple, int
    return filler


@dataclass(frozen=True, slots=True)
class CpuLoop:
    label: str
    loop: Callable[[int, FakeTask, Probe], None]
    traced: bool = False  # tracemalloc at 1 frame around the loop
    thread_drain: bool = False  # the socket read by a thread of this process
    heap_blocks: int = 0  # grow the heap to this many blocks first


def _time_loop(spec: CpuLoop, n: int, socket_path: str) -> tuple[float, float, int]:
    """Thread and process CPU microseconds per task of one loop, and messages dropped."""
    filler = grow_heap(spec.heap_blocks)
    probe = Probe(Channel(socket_path), heartbeat_seconds=0)
    task = FakeTask("proj.tasks.noop")
    spec.loop(64, task, probe)  # connect, open statm, warm the caches
    gc.collect()
    if spec.traced:
        tracemalloc.start(1)
    try:
        t0, p0 = time.thread_time(), time.process_time()
        spec.loop(n, task, probe)
        t1, p1 = time.thread_time(), time.process_time()
    finally:
        if spec.traced:
            tracemalloc.stop()
    dropped = probe.channel.dropped + probe.errors
    probe.close()
    del filler
    return (t1 - t0) / n * 1e6, (p1 - p0) / n * 1e6, dropped


WORKER_HEAP_BLOCKS = 320_000  # a fresh process that imported Celery's worker: ~316,000
LOOPS = (
    CpuLoop("bare loop", loop_bare),
    CpuLoop("open+read /proc/self/statm", loop_statm),
    CpuLoop("billiard mem_rss (getrusage), what --max-memory-per-child adds", loop_getrusage),
    CpuLoop("the probe: on_task_prerun + on_task_postrun", loop_probe),
    CpuLoop("the probe, tracemalloc at 1 frame around the loop", loop_probe, traced=True),
    CpuLoop("the probe, socket read by a thread of this process", loop_probe, thread_drain=True),
    CpuLoop(
        f"the probe, heap grown to {WORKER_HEAP_BLOCKS:,} blocks (a worker's)",
        loop_probe,
        heap_blocks=WORKER_HEAP_BLOCKS,
    ),
)


def measure_cpu(args: argparse.Namespace) -> list[CpuResult]:
    """Every loop, interleaved, ``args.cpu_rounds`` times."""
    results = [CpuResult(spec.label) for spec in LOOPS]
    with drained_socket() as by_process, drained_socket(in_thread=True) as by_thread:
        for _ in range(args.cpu_rounds):
            for spec, res in zip(LOOPS, results, strict=True):
                path = by_thread if spec.thread_drain else by_process
                thread_us, process_us, dropped = _time_loop(spec, args.cpu_tasks, path)
                res.thread_us.append(thread_us)
                res.process_us.append(process_us)
                res.dropped += dropped
    return results


def timed(step: Callable[[], object], n: int) -> float:
    """Thread CPU microseconds per call of ``step``, less the empty loop's."""

    def run() -> float:
        t0 = time.thread_time()
        for _ in range(n):
            step()
        return time.thread_time() - t0

    run()  # warm up
    spent = run()
    t0 = time.thread_time()
    for _ in range(n):
        pass
    return max(0.0, spent - (time.thread_time() - t0)) / n * 1e6


def measure_steps(n: int) -> list[tuple[str, float]]:
    """Each step of prerun + postrun alone, in the order the receivers take them:
    thread CPU microseconds per task, the timing loop's own cost subtracted."""
    with drained_socket() as drain:
        probe = Probe(Channel(drain), heartbeat_seconds=0)
        task = FakeTask("proj.tasks.noop")
        loop_probe(64, task, probe)
        pid, ticks = probe._identity()
        tid, name, started = _IDS[0], task.name, time.time()
        call: list[Any] = [started, 1.0, 1.0, 100, 1, name, None, 0]
        f_fields = (pid, ticks, tid, name, started, started, 0.001, "SUCCESS")
        f_fields += (12_345_678, 0.0001, None, None, 3, None, 0)
        s_msg = wire.encode("s", pid, ticks, tid, name, started)
        f_msg = wire.encode("f", *f_fields)
        running, send = probe._running, probe.channel.send

        def identity() -> None:
            probe._identity()
            probe._identity()

        def clocks() -> None:  # prerun reads all three, postrun again
            time.time()
            time.monotonic()
            time.thread_time()
            time.time()
            time.monotonic()
            time.thread_time()

        def blocks() -> None:  # around 1 call in 16 (BLOCKS_SAMPLE): the mean per call
            if random.random() < BLOCKS_SAMPLE:
                sys.getallocatedblocks()
                sys.getallocatedblocks()

        quoted = _quote(name)

        def format_s() -> bytes:  # as on_task_prerun formats it
            return f'["s",{pid},{ticks},{_quote(tid)},{quoted},{started!r}]\n'.encode()

        def format_f() -> bytes:  # as on_task_postrun formats it (15 fields)
            return (
                f'["f",{pid},{ticks},{_quote(tid)},{quoted},{started!r},{started!r},'
                f"{0.001!r},{_quote('SUCCESS')},12345678,{0.0001!r},null,null,3,null,0]\n"
            ).encode()

        def task_fields() -> None:
            str(getattr(task, "name", "?"))[: wire.MAX_NAME]
            getattr(getattr(task, "request", None), "retries", 0)

        def table() -> None:
            len(running)
            running[str(tid)] = [started, 1.0, 1.0, 100, threading.get_ident(), name, None, 0]
            running.pop(str(tid), None)

        def deltas() -> None:
            max(0.0, 2.0 - call[2])
            200 - call[3]

        def sends() -> None:
            send(s_msg)
            send(f_msg)

        steps: list[tuple[str, Callable[[], object]]] = [
            ("_identity() x2 (getpid, compare)", identity),
            ("clocks x2: time, monotonic, thread_time", clocks),
            ("getallocatedblocks x2, on 1 call in 16", blocks),
            ("task name and retries (getattr)", task_fields),
            ("running table: len, list built and stored, popped", table),
            ("format 's' by hand (5 fields)", format_s),
            ("format 'f' by hand (15 fields)", format_f),
            ("rss_bytes(): pread of statm, split, int", probe.rss_bytes),
            ("smaps_if_due() when not due", lambda: probe.smaps_if_due(0.0)),
            ("cpu and blocks deltas", deltas),
            ("channel.send x2: lock, getpid, socket send", sends),
        ]

        results = [(label, timed(step, n)) for label, step in steps]
        results.append(("sum of the steps", sum(us for _, us in results)))
        probe.close()
    # The block count walks every pool of the allocator: its cost is the heap's size.
    results[2] = (f"{results[2][0]} ({sys.getallocatedblocks():,} blocks)", results[2][1])
    for blocks in (WORKER_HEAP_BLOCKS, 1_500_000):
        filler = grow_heap(blocks)
        label = f"sys.getallocatedblocks() x2 at {sys.getallocatedblocks():,} blocks"
        results.append((label, timed(sys.getallocatedblocks, n // 20) * 2))
        del filler
    return results


def report_cpu(results: list[CpuResult], steps: list[tuple[str, float]], n: int) -> float:
    """Print both tables; return the probe's median thread CPU per task (us)."""
    bare = statistics.median(results[0].thread_us)
    rows = []
    for res in results:
        med = statistics.median(res.thread_us)
        rows.append(
            (
                res.label,
                f"{med:.2f} us",
                f"{min(res.thread_us):.2f}-{max(res.thread_us):.2f}",
                f"{med - bare:.2f} us",
                f"{statistics.median(res.process_us):.2f} us",
                f"{res.dropped:,}",
            )
        )
    print_table(
        f"Probe: CPU per task, {n:,} tasks a loop (median of rounds)",
        [
            "loop",
            "thread CPU / task",
            "range",
            "minus bare loop",
            "process CPU / task",
            "dropped",
        ],
        rows,
    )
    print_table(
        "Probe: each step of prerun + postrun alone (thread CPU per task)",
        ["step", "cost"],
        [(label, f"{us:.2f} us") for label, us in steps],
    )
    return statistics.median(results[3].thread_us) - bare


# -- 3. memory -----------------------------------------------------------------------


def _table_bytes(probe: Probe) -> int:
    """What the probe's tables hold: the running table with its keys and lists (not
    the task names, which belong to the tasks) and a message cut short."""
    running = probe._running
    total = sys.getsizeof(running) + sys.getsizeof(probe.channel._pending)
    for task_id, call in running.items():
        total += sys.getsizeof(task_id) + sys.getsizeof(call)
        total += sum(sys.getsizeof(v) for i, v in enumerate(call) if i != 5 and v is not None)
    return total


@dataclass(frozen=True, slots=True)
class MemPoint:
    tasks: int
    running: int
    table_bytes: int
    blocks_delta: int  # Python's allocated blocks since the probe was made (process-wide)
    sent: int
    dropped: int


def measure_memory(
    path: str, tasks: int, checkpoints: list[int], lost_every: int = 100
) -> tuple[list[MemPoint], int]:
    """Run ``tasks`` tasks through a fresh Probe; return the checkpoints and the most
    entries the running table ever held."""
    names = [FakeTask(f"proj.tasks.task_{k:04d}") for k in range(1000)]
    probe = Probe(Channel(path), heartbeat_seconds=0)
    pre, post = probe.on_task_prerun, probe.on_task_postrun
    pre(task_id="first", task=names[0])  # open statm, try the socket once
    post(task_id="first", task=names[0], state="SUCCESS")
    gc.collect()
    blocks_before = sys.getallocatedblocks()
    points, most, marks = [], 0, set(checkpoints)
    for i in range(1, tasks + 1):
        task = names[i % 1000]
        tid = f"00000000-0000-4000-8000-{i:012x}"
        pre(signal=None, sender=task, task_id=tid, task=task, args=(), kwargs={})
        if i % lost_every != 37:  # 1% never finish: the prerun's entry is left behind
            post(signal=None, sender=task, task_id=tid, task=task, state="SUCCESS")
        most = max(most, len(probe._running))
        if i in marks:
            gc.collect()
            points.append(
                MemPoint(
                    i,
                    len(probe._running),
                    _table_bytes(probe),
                    sys.getallocatedblocks() - blocks_before,
                    probe.channel.sent,
                    probe.channel.dropped,
                )
            )
    probe.close()
    return points, most


def report_memory(runs: list[tuple[str, list[MemPoint], int]], args: argparse.Namespace) -> bool:
    rows = []
    bounded = True
    for label, points, most in runs:
        for p in points:
            rows.append(
                (
                    label,
                    f"{p.tasks:,}",
                    f"{p.running:,}",
                    f"{p.table_bytes / 1024:,.0f} KiB",
                    f"{p.blocks_delta:+,}",
                    f"{p.sent:,}",
                    f"{p.dropped:,}",
                )
            )
        bounded = bounded and most <= 1024
        rows.append((label, "most held", f"{most:,}", "", "", "", ""))
    print_table(
        f"Probe: retained memory over {args.mem_tasks:,} tasks, 1,000 names, 1% never finished",
        [
            "warden",
            "tasks",
            "running entries",
            "tables (getsizeof)",
            "Python blocks since start",
            "messages sent",
            "dropped",
        ],
        rows,
    )
    return bounded


# -- main ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("throughput", "cpu", "memory"), help="one part")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--tasks", type=int, default=5_000, help="measured tasks a round")
    parser.add_argument("--warmup", type=int, default=500, help="tasks before the start mark")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four variants")
    parser.add_argument(
        "--variants",
        default=",".join(v.key for v in VARIANTS),
        help="worker variants to run (none must be one)",
    )
    parser.add_argument("--prefetch", type=int, default=16, help="worker_prefetch_multiplier")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a round may take")
    parser.add_argument("--cpu-tasks", type=int, default=50_000, help="calls a CPU loop")
    parser.add_argument("--cpu-rounds", type=int, default=3, help="rounds of the CPU loops")
    parser.add_argument("--mem-tasks", type=int, default=150_000, help="tasks a memory run")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}; load average {load_average()}", flush=True)
    verdicts = []
    if args.only in (None, "cpu"):
        print("measuring the probe's CPU per task...", flush=True)
        cpu = measure_cpu(args)
        steps = measure_steps(args.cpu_tasks)
        probe_us = report_cpu(cpu, steps, args.cpu_tasks)
        ok = probe_us <= TARGET_CPU_US
        verdicts.append(
            f"target probe CPU <= {TARGET_CPU_US:.0f} us a task: {probe_us:.1f} us "
            f"-> {'met' if ok else 'MISSED'}"
        )
    if args.only in (None, "memory"):
        print("measuring the probe's memory...", flush=True)
        checkpoints = sorted({10_000, 50_000, 100_000, 120_000, args.mem_tasks} - {0})
        checkpoints = [c for c in checkpoints if c <= args.mem_tasks]
        with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp:
            absent = measure_memory(os.path.join(tmp, "nobody.sock"), args.mem_tasks, checkpoints)
        with drained_socket() as drain:
            present = measure_memory(drain, args.mem_tasks, checkpoints)
        ok = report_memory([("absent", *absent), ("present", *present)], args)
        verdicts.append(
            f"probe memory bounded (running table <= 1,024): {'met' if ok else 'MISSED'}"
        )
    if args.only in (None, "throughput"):
        print("measuring worker throughput...", flush=True)
        results, in_worker = measure_throughput(args)
        share = report_throughput(results, args)
        report_in_worker(in_worker)
        ok = share >= TARGET_THROUGHPUT
        verdicts.append(
            f"target probe keeps >= {TARGET_THROUGHPUT:.0%} of no-probe throughput: "
            f"{share:.1%} -> {'met' if ok else 'MISSED'}"
        )
    for line in verdicts:
        print(line)
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
