"""Which task names carry a process's memory growth, and how much each call keeps.

A Celery prefork child runs many task names one after another (a ``threads`` pool
runs several at once in one process), and the probe reads the process's RSS right
after every call. A per-call delta cannot be trusted: RSS grows in sparse steps (a
4 KiB page, a 132 KiB extension of glibc's heap), so a small leak shows as a jump
every tenth or hundredth call and the median delta is 0. So the calls are grouped:

1. **Warm-up.** Each process's first ``attribution_warmup_calls`` calls (or
   ``attribution_warmup_fraction`` of them, never more than half) are dropped, and
   so is the first call of every name in every process: imports, connection pools
   and caches are paid once, by whichever call comes first.
2. **Blocks.** The rest is cut into blocks of consecutive calls, about √calls long
   (at least 8, and longer when there are more than ``attribution_max_blocks``
   blocks in all), so a block spans several allocator steps. A block's growth is
   the sum of its calls' deltas; its regressors are its calls of each name.
3. **Jumps.** The blocks of every process are pooled into one regression without
   intercept, growth = Σ bytes_per_call[name] * calls[name], fitted with Huber's
   M-estimator by iteratively reweighted least squares. The scale is a high
   quantile of the residuals, not their MAD: when most blocks hold no allocator
   step the MAD is near 0 and would clip the steps that *are* the leak. A block far
   outside the band (a high-water mark raised once by a big transient allocation)
   is a one-off jump: its growth is replaced by what the fit predicts.
4. **Levels.** The estimate itself comes from the memory *levels*: each process's
   cumulative growth regressed on its cumulative calls per name, with a level of
   its own per process. RSS noise is bounded (where a reading falls within a heap
   step); differences double it at every block, levels do not, so the estimate
   sharpens as fast as calls accumulate rather than as their square root.
5. **Interval.** A sandwich covariance whose scores are summed over runs of
   ``CLUSTER_POINTS`` neighbouring levels (they share their noise: a heap step
   stays until trimmed), with a Student t quantile on the number of runs; the
   least-called names share the "other" column until each column has at least
   ``CLUSTERS_PER_COLUMN`` runs, or the interval is too narrow.

Names with fewer than ``attribution_min_calls`` calls after warm-up, or beyond the
``attribution_max_names`` most called, share one "other" column: they still take
their share of the growth, but get no estimate. Names whose calls rise and fall
together across blocks (one always follows the other) cannot be told apart: they are
fitted as one group and reported as insufficient data, never as a leak.

Growth that follows time rather than calls (a background thread's buffer) has no
column and lands on the busiest names: ``attribution_min_leak_bytes`` absorbs it.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from celery_warden._records import TaskFinished, Verdict
from celery_warden.analysis._format import bytes_unit, format_bytes, format_count
from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = ["TaskAttribution", "attribute_growth"]

MIN_BLOCK_CALLS = 8  # a block shorter than this rarely spans one allocator step
MIN_RESIDUAL_DOF = 5  # blocks beyond the columns, for the scale and the sandwich
# Huber's constant in units of the scale below, and the scale: the 80th percentile
# of |residual| over its normal value (1.2816 sigma). With this the band is about
# 1.5 times the 80th percentile, wide enough to keep the steps a leak is made of
# (which fill more than a fifth of blocks once a block spans a few of them) and
# narrow enough that a 10 MiB one-off jump weighs as little as a few pages.
HUBER_K = 2.0
SCALE_QUANTILE = 0.8
SCALE_Z = 1.2816
SCALE_FLOOR_BYTES = 4096.0  # RSS moves in pages: no scale is finer than one
JUMP_K = 3.0
CLUSTERS_PER_COLUMN = 3  # fewer clusters per column make the sandwich too narrow
CLUSTER_POINTS = 4  # consecutive levels whose scores are summed before the sandwich
MAX_VIF = 1000.0  # variance inflation past which a name is merged with its partner
MAX_ITERATIONS = 50
TOLERANCE_BYTES = 0.01  # per call: IRLS stops when no estimate moves more

_NORMAL = statistics.NormalDist()

Matrix = list[list[float]]
# A block: its growth in bytes, its calls per column as two parallel tuples, its process.
Block = tuple[float, tuple[int, ...], tuple[float, ...], int]


@dataclass(frozen=True, slots=True)
class TaskAttribution:
    """The memory one task name keeps per call, with the evidence.

    Attributes:
        name: The task's registered name.
        calls: Calls of this name that entered the fit (after warm-up).
        processes: Processes it ran in, among those that entered the fit.
        retained_bytes_per_call: RSS kept per call, the name's fitted coefficient;
            None when it could not be estimated (too few calls, lumped with other
            names, or not separable from another name).
        interval_low: Lower end of the two-sided interval at
            ``attribution_confidence``; None with the estimate.
        interval_high: Upper end of that interval.
        py_blocks_per_call: Mean change of Python's allocated blocks per call, over
            the calls where the probe read it: objects created and kept, which points
            at Python code rather than a C extension or the allocator.
        verdict: LEAK, STABLE or INSUFFICIENT_DATA (never WARMING_UP: warm-up is cut
            away before the fit).
        reason: One sentence a person can read, with the evidence.
    """

    name: str
    calls: int
    processes: int
    retained_bytes_per_call: float | None
    interval_low: float | None
    interval_high: float | None
    py_blocks_per_call: float | None
    verdict: Verdict
    reason: str


@dataclass(frozen=True, slots=True)
class _Fit:
    """Per column: the estimate and its interval, and the growth the blocks showed."""

    estimates: list[float]
    lows: list[float]
    highs: list[float]
    total_growth: float


@dataclass(slots=True)
class _NameStats:
    """What the segment pass learns of one name."""

    calls: int = 0
    processes: int = 0
    blocks_sum: int = 0
    blocks_known: int = 0


def attribute_growth(
    processes: Sequence[Sequence[TaskFinished]],
    thresholds: AnalysisThresholds = DEFAULT_THRESHOLDS,
) -> list[TaskAttribution]:
    """Estimate the memory each task name keeps per call, across processes.

    Args:
        processes: Per process, its finished calls in end-time order. Calls without
            ``rss_after_bytes`` count towards the next reading's growth.
        thresholds: The thresholds to apply (the ``attribution_*`` fields).

    Returns:
        One entry per task name seen: leaks first (most bytes per call first), then
        the rest by calls, then by name. 2,000,000 calls of 1,000 names in 8
        processes take about 4 s (tests/unit/test_analysis_attribution.py).

    >>> attribute_growth([])
    []
    """
    segments_by_process, stats = _collect_segments(processes, thresholds)
    names = _choose_columns(stats, thresholds)
    blocks = _cut_blocks(segments_by_process, names, thresholds)
    width = len(names) + (1 if len(names) < len(stats) else 0)
    room = len(blocks) // (CLUSTERS_PER_COLUMN * CLUSTER_POINTS)
    if room < width:
        # Too few blocks for an honest sandwich over every column (it shrinks as the
        # columns near the clusters): the least called names join "other".
        names = names[: max(0, room - 1)]
        blocks = _cut_blocks(segments_by_process, names, thresholds)
    columns = _Columns([[name] for name in names], [False] * len(names))
    if len(names) < len(stats):
        columns.members.append([])  # "other": its names are all the rest
        columns.is_other.append(True)
    fit: _Fit | None = None
    if columns.members and len(blocks) >= len(columns.members) + MIN_RESIDUAL_DOF:
        blocks = _merge_inseparable(blocks, columns)
        fit = _fit_blocks(blocks, len(columns.members), thresholds)
    results = [
        _attribute(name, stats.get(name, _NameStats()), columns, fit, thresholds)
        for name in _names_seen(processes)
    ]
    results.sort(key=_order)
    return results


@dataclass(slots=True)
class _Columns:
    """The columns of the fit: the names each one counts, and which is "other"."""

    members: list[list[str]]
    is_other: list[bool]

    def find(self, name: str) -> int | None:
        """Return the column counting ``name``: its own, a merged group's, or "other"."""
        for i, members in enumerate(self.members):
            if name in members:
                return i
        return self.is_other.index(True) if True in self.is_other else None


def _order(result: TaskAttribution) -> tuple[int, float, int, str]:
    """Return the sort key: leaks by bytes per call, then the rest by calls."""
    if result.verdict is Verdict.LEAK:
        return (0, -(result.retained_bytes_per_call or 0.0), 0, result.name)
    return (1, 0.0, -result.calls, result.name)


def _names_seen(processes: Sequence[Sequence[TaskFinished]]) -> list[str]:
    """Return every name of every call, once each, in order of first appearance."""
    return list(dict.fromkeys(call.name for calls in processes for call in calls))


def _warmup_calls(count: int, thresholds: AnalysisThresholds) -> int:
    """Return how many of a process's ``count`` calls are warm-up (at most half)."""
    share = round(thresholds.attribution_warmup_fraction * count)
    return min(max(thresholds.attribution_warmup_calls, share), count // 2)


# Per process, per call that entered the fit: the growth it carries, and its name.
Series = tuple[list[float], list[str]]


def _collect_segments(
    processes: Sequence[Sequence[TaskFinished]], thresholds: AnalysisThresholds
) -> tuple[list[Series], dict[str, _NameStats]]:
    """Return per process the calls after warm-up with their growth, and per-name figures.

    A call's growth is the RSS change since the previous reading. Calls without a
    reading carry 0 and the next reading's call carries their share: a block sums
    them alike. A stretch between readings that holds a name's first call in the
    process is dropped with the warm-up.
    """
    stats: dict[str, _NameStats] = {}
    by_process: list[Series] = []
    for calls in processes:
        warmup = _warmup_calls(len(calls), thresholds)
        deltas: list[float] = []
        names: list[str] = []
        seen: set[str] = set()
        pending: list[TaskFinished] = []
        tainted = False
        previous: int | None = None
        for index, call in enumerate(calls):
            name = call.name
            if name not in seen:
                seen.add(name)
                tainted = True
            rss = call.rss_after_bytes
            if rss is None:
                pending.append(call)
                continue
            if previous is not None and index >= warmup and not tainted:
                for member in pending:
                    deltas.append(0.0)
                    names.append(member.name)
                deltas.append(float(rss - previous))
                names.append(name)
                if call.py_blocks_delta is not None or pending:
                    _count_blocks(stats, [*pending, call])
            previous = rss
            if pending:
                pending = []
            tainted = False
        for name, count in Counter(names).items():
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = _NameStats()
            entry.calls += count
            entry.processes += 1
        by_process.append((deltas, names))
    return by_process, stats


def _count_blocks(stats: dict[str, _NameStats], calls: list[TaskFinished]) -> None:
    """Add the Python-block changes of ``calls`` to their names' figures."""
    for call in calls:
        if call.py_blocks_delta is not None:
            entry = stats.get(call.name)
            if entry is None:
                entry = stats[call.name] = _NameStats()
            entry.blocks_sum += call.py_blocks_delta
            entry.blocks_known += 1


def _choose_columns(stats: dict[str, _NameStats], thresholds: AnalysisThresholds) -> list[str]:
    """Return the names fitted one by one: the most called with enough calls."""
    eligible = [n for n, s in stats.items() if s.calls >= thresholds.attribution_min_calls]
    eligible.sort(key=lambda n: (-stats[n].calls, n))
    return eligible[: thresholds.attribution_max_names]


def _cut_blocks(
    series: list[Series], names: list[str], thresholds: AnalysisThresholds
) -> list[Block]:
    """Return the blocks of every process; names outside ``names`` count as "other"."""
    index = {name: i for i, name in enumerate(names)}
    other = len(names)
    total = sum(len(process_names) for _, process_names in series)
    longest = math.ceil(total / thresholds.attribution_max_blocks) if total else 1
    blocks: list[Block] = []
    for process, (deltas, process_names) in enumerate(series):
        calls = len(deltas)
        if calls < MIN_BLOCK_CALLS:
            continue
        size = max(MIN_BLOCK_CALLS, round(math.sqrt(calls)), longest)
        count = max(1, calls // size)
        columns = [index.get(name, other) for name in process_names]
        for b in range(count):
            # An even cut: the last block takes the remainder.
            lo, hi = b * calls // count, (b + 1) * calls // count
            counts = Counter(columns[lo:hi])
            keys = tuple(sorted(counts))
            values = tuple(float(counts[k]) for k in keys)
            blocks.append((math.fsum(deltas[lo:hi]), keys, values, process))
    return blocks


def _merge_inseparable(blocks: list[Block], columns: _Columns) -> list[Block]:
    """Merge columns whose calls move together across blocks; return the new blocks.

    A column is inseparable when the others explain its counts almost exactly
    (variance inflation above :data:`MAX_VIF`, on the uncentred correlation matrix,
    as the fit has no intercept): its estimate would be any number at all. It is
    merged into the column it is most correlated with, given the rest.
    """
    while len(columns.members) > 1:
        inverse = _invert(_correlation(_gram(blocks, len(columns.members))))
        if inverse is None:
            worst = _first_dependent(_correlation(_gram(blocks, len(columns.members))))
            partner = _most_collinear(blocks, len(columns.members), worst)
        else:
            vif = [inverse[k][k] for k in range(len(inverse))]
            worst = max(range(len(vif)), key=vif.__getitem__)
            if vif[worst] <= MAX_VIF:
                return blocks
            partial = [
                abs(inverse[worst][j]) / math.sqrt(inverse[worst][worst] * inverse[j][j])
                if j != worst
                else -1.0
                for j in range(len(inverse))
            ]
            partner = max(range(len(partial)), key=partial.__getitem__)
        blocks = _merge_column(blocks, worst, partner)
        columns.members[partner].extend(columns.members.pop(worst))
        other = columns.is_other.pop(worst)
        columns.is_other[partner - (1 if partner > worst else 0)] |= other
    return blocks


def _merge_column(blocks: list[Block], source: int, target: int) -> list[Block]:
    """Return ``blocks`` with column ``source`` added into ``target`` and removed."""
    merged: list[Block] = []
    into = target - (1 if target > source else 0)
    for growth, keys, values, process in blocks:
        counts: dict[int, float] = {}
        for k, v in zip(keys, values, strict=True):
            j = into if k == source else k - (1 if k > source else 0)
            counts[j] = counts.get(j, 0.0) + v
        ordered = tuple(sorted(counts))
        merged.append((growth, ordered, tuple(counts[k] for k in ordered), process))
    return merged


def _most_collinear(blocks: list[Block], width: int, column: int) -> int:
    """Return the column whose counts are most correlated with ``column``'s (uncentred)."""
    gram = _gram(blocks, width)
    scores = [
        abs(gram[column][j]) / math.sqrt(gram[column][column] * gram[j][j])
        if j != column and gram[j][j] > 0 and gram[column][column] > 0
        else -1.0
        for j in range(width)
    ]
    return max(range(width), key=scores.__getitem__)


def _first_dependent(matrix: Matrix) -> int:
    """Return the first column that the earlier ones explain (a singular pivot)."""
    for size in range(1, len(matrix) + 1):
        if _invert([row[:size] for row in matrix[:size]]) is None:
            return size - 1
    return len(matrix) - 1


def _gram(blocks: list[Block], width: int, weights: list[float] | None = None) -> Matrix:
    """Return Σ w x xᵀ over the blocks (w = 1 without ``weights``)."""
    gram = [[0.0] * width for _ in range(width)]
    for b, (_, keys, values, _p) in enumerate(blocks):
        w = 1.0 if weights is None else weights[b]
        if w == 0.0:
            continue
        if 3 * len(keys) > width:
            # A block holding most names: whole rows at once are faster than pairs.
            dense = [0.0] * width
            for k, v in zip(keys, values, strict=True):
                dense[k] = v
            for i, vi in zip(keys, values, strict=True):
                row, wv = gram[i], w * vi
                row[:] = [a + wv * d for a, d in zip(row, dense, strict=True)]
            continue
        for i, vi in zip(keys, values, strict=True):
            row = gram[i]
            wv = w * vi
            for j, vj in zip(keys, values, strict=True):
                row[j] += wv * vj
    return gram


def _correlation(gram: Matrix) -> Matrix:
    """Return the Gram matrix scaled to a unit diagonal (0 rows stay 0)."""
    scale = [1.0 / math.sqrt(gram[i][i]) if gram[i][i] > 0 else 0.0 for i in range(len(gram))]
    return [[gram[i][j] * scale[i] * scale[j] for j in range(len(gram))] for i in range(len(gram))]


def _invert(matrix: Matrix) -> Matrix | None:
    """Return the inverse of a symmetric positive matrix, or None if it is singular.

    Gauss-Jordan with partial pivoting; a pivot below 1e-10 of the diagonal's largest
    entry counts as singular (fine for the correlation-scaled matrices used here).
    """
    size = len(matrix)
    work = [[*row, *(1.0 if i == j else 0.0 for j in range(size))] for i, row in enumerate(matrix)]
    tiny = 1e-10 * max((abs(matrix[i][i]) for i in range(size)), default=0.0)
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(work[r][col]))
        if abs(work[pivot][col]) <= tiny or tiny == 0.0:
            return None
        work[col], work[pivot] = work[pivot], work[col]
        head = work[col]
        inv = 1.0 / head[col]
        head[:] = [v * inv for v in head]
        for r in range(size):
            if r != col and work[r][col] != 0.0:
                factor = work[r][col]
                row = work[r]
                row[:] = [a - factor * b for a, b in zip(row, head, strict=True)]
    return [row[size:] for row in work]


def _fit_blocks(blocks: list[Block], width: int, thresholds: AnalysisThresholds) -> _Fit | None:
    """Fit the blocks by Huber IRLS; return estimates and sandwich intervals.

    The full Gram matrix is built once; each iteration only takes away the share of
    the few down-weighted blocks, which keeps an iteration far cheaper than a pass.
    """
    full = _gram(blocks, width)
    scaled = _scaled_inverse(full)
    if scaled is None:
        return None
    beta = _solve(scaled, _cross(blocks, width, None))
    weights = [1.0] * len(blocks)
    for _ in range(MAX_ITERATIONS):
        residuals = [_residual(block, beta) for block in blocks]
        cut = HUBER_K * _scale(residuals)
        weights = [1.0 if abs(r) <= cut else cut / abs(r) for r in residuals]
        gram = [row[:] for row in full]
        for (_, keys, values, _p), w in zip(blocks, weights, strict=True):
            if w < 1.0:
                for i, vi in zip(keys, values, strict=True):
                    row = gram[i]
                    for j, vj in zip(keys, values, strict=True):
                        row[j] -= (1.0 - w) * vi * vj
        scaled = _scaled_inverse(gram)
        if scaled is None:
            return None
        new = _solve(scaled, _cross(blocks, width, weights))
        moved = max(abs(a - b) for a, b in zip(new, beta, strict=True))
        beta = new
        if moved <= TOLERANCE_BYTES:
            break
    residuals = [_residual(block, beta) for block in blocks]
    cut = HUBER_K * _scale(residuals)
    # A block far outside the band holds a one-off jump: replace its growth with what
    # the fit predicts. Blocks merely clipped stay whole: in levels a clipped step would
    # shift every later reading.
    cleaned = [
        block[0] - r if abs(r) > JUMP_K * cut else block[0]
        for block, r in zip(blocks, residuals, strict=True)
    ]
    return _fit_levels(blocks, cleaned, width, thresholds)


def _fit_levels(
    blocks: list[Block], cleaned: list[float], width: int, thresholds: AnalysisThresholds
) -> _Fit | None:
    """Fit memory levels on cumulative calls within each process; return sandwich intervals.

    Differencing suits the robust step, but RSS noise is bounded (where a reading
    falls within a heap step), and differences double it at every block. In levels
    the noise stays put while the cumulative counts wander apart like random walks,
    so the estimates sharpen as calls accumulate rather than as their square root.
    """
    rows: list[list[float]] = []
    levels: list[float] = []
    owners: list[int] = []
    start = 0
    processes = 0
    while start < len(blocks):
        end = start
        while end < len(blocks) and blocks[end][3] == blocks[start][3]:
            end += 1
        # The process's own level before its first block is a point too: 0 calls, 0 growth.
        level = 0.0
        counts = [0.0] * width
        points = [(0.0, counts[:])]
        for b in range(start, end):
            level += cleaned[b]
            for k, v in zip(blocks[b][1], blocks[b][2], strict=True):
                counts[k] += v
            points.append((level, counts[:]))
        # Within-process centring stands for a free intercept per process.
        mean_level = math.fsum(p[0] for p in points) / len(points)
        means = [math.fsum(p[1][k] for p in points) / len(points) for k in range(width)]
        for value, row in points:
            owners.append(processes)
            levels.append(value - mean_level)
            rows.append([v - m for v, m in zip(row, means, strict=True)])
        processes += 1
        start = end
    dof = len(rows) - width - processes
    if dof < MIN_RESIDUAL_DOF:
        return None
    gram = _dense_gram(rows, None)
    bread = _scaled_inverse(gram)
    if bread is None:
        return None
    beta = _solve(
        bread,
        [math.fsum(r[k] * y for r, y in zip(rows, levels, strict=True)) for k in range(width)],
    )
    errors = [
        y - sum(b * x for b, x in zip(beta, r, strict=True))
        for r, y in zip(rows, levels, strict=True)
    ]
    # Neighbouring levels share their noise (a heap step stays until trimmed), so the
    # scores are summed over runs of CLUSTER_POINTS points of one process, and the
    # runs, not the points, are the independent units (batch means).
    scores: list[list[float]] = []
    for a, (x, e) in enumerate(zip(rows, errors, strict=True)):
        if a % CLUSTER_POINTS == 0 or owners[a] != owners[a - 1]:
            scores.append([0.0] * width)
        total = scores[-1]
        total[:] = [t + e * v for t, v in zip(total, x, strict=True)]
    clusters = len(scores)
    if clusters <= width + 1:
        return None
    meat = _dense_gram(scores, None)
    correction = clusters / (clusters - 1.0) * (len(rows) - 1.0) / dof
    half = _t_quantile(0.5 + thresholds.attribution_confidence / 2.0, clusters - 1)
    lows: list[float] = []
    highs: list[float] = []
    for k in range(width):
        row = bread[k]
        variance = correction * sum(
            row[i] * sum(meat[i][j] * row[j] for j in range(width)) for i in range(width)
        )
        spread = half * math.sqrt(max(variance, 0.0))
        lows.append(beta[k] - spread)
        highs.append(beta[k] + spread)
    return _Fit(beta, lows, highs, math.fsum(block[0] for block in blocks))


def _dense_gram(rows: list[list[float]], weights: list[float] | None) -> Matrix:
    """Return Σ w x xᵀ over dense rows."""
    width = len(rows[0]) if rows else 0
    gram = [[0.0] * width for _ in range(width)]
    for b, x in enumerate(rows):
        w = 1.0 if weights is None else weights[b]
        for i in range(width):
            wx = w * x[i]
            if wx != 0.0:
                row = gram[i]
                row[:] = [a + wx * v for a, v in zip(row, x, strict=True)]
    return gram


def _scaled_inverse(gram: Matrix) -> Matrix | None:
    """Return the inverse of ``gram``, computed on its correlation form for stability."""
    size = len(gram)
    if any(gram[i][i] <= 0 for i in range(size)):
        return None
    scale = [1.0 / math.sqrt(gram[i][i]) for i in range(size)]
    inverse = _invert(_correlation(gram))
    if inverse is None:
        return None
    return [[inverse[i][j] * scale[i] * scale[j] for j in range(size)] for i in range(size)]


def _cross(blocks: list[Block], width: int, weights: list[float] | None) -> list[float]:
    """Return Σ w y x over the blocks."""
    total = [0.0] * width
    for b, (growth, keys, values, _p) in enumerate(blocks):
        w = 1.0 if weights is None else weights[b]
        for k, v in zip(keys, values, strict=True):
            total[k] += w * growth * v
    return total


def _solve(inverse: Matrix, vector: list[float]) -> list[float]:
    """Return ``inverse @ vector``."""
    return [sum(a * b for a, b in zip(row, vector, strict=True)) for row in inverse]


def _residual(block: Block, beta: list[float]) -> float:
    """Return a block's growth minus what the estimates predict for it."""
    growth, keys, values, _ = block
    return growth - sum(beta[k] * v for k, v in zip(keys, values, strict=True))


def _scale(residuals: list[float]) -> float:
    """Return the residuals' robust scale: a high quantile of |r|, at least one page."""
    ordered = sorted(abs(r) for r in residuals)
    at = ordered[min(len(ordered) - 1, int(SCALE_QUANTILE * len(ordered)))]
    return max(at / SCALE_Z, SCALE_FLOOR_BYTES)


def _t_quantile(p: float, dof: int) -> float:
    """Return Student's t quantile by the Cornish-Fisher expansion (A&S 26.7.5).

    Within 1% of the exact value from 5 degrees of freedom at the 99.5% point; the
    fit never runs on fewer.
    """
    z = _NORMAL.inv_cdf(p)
    n = float(dof)
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    return z + g1 / n + g2 / n**2 + g3 / n**3 + g4 / n**4


def _attribute(
    name: str,
    stats: _NameStats,
    columns: _Columns,
    fit: _Fit | None,
    thresholds: AnalysisThresholds,
) -> TaskAttribution:
    """Return the attribution of one name from its column of the fit."""
    blocks = stats.blocks_sum / stats.blocks_known if stats.blocks_known else None

    def insufficient(reason: str) -> TaskAttribution:
        return TaskAttribution(
            name, stats.calls, stats.processes, None, None, None, blocks,
            Verdict.INSUFFICIENT_DATA, reason,
        )  # fmt: skip

    if stats.calls < thresholds.attribution_min_calls:
        return insufficient(
            f"only {format_count(stats.calls)} calls after warm-up "
            f"(need {thresholds.attribution_min_calls}) to tell what one call keeps"
        )
    column = columns.find(name)
    if fit is None or column is None:
        return insufficient(
            f"{format_count(stats.calls)} calls, but too few blocks of calls "
            "across processes to fit every name"
        )
    if name not in columns.members[column]:
        return insufficient(
            f"{format_count(stats.calls)} calls, fewer than the "
            f"{thresholds.attribution_max_names} most called names, so counted with the rest"
        )
    if len(columns.members[column]) > 1 or columns.is_other[column]:
        partners = [n for n in columns.members[column] if n != name]
        together = ", ".join(partners[:3]) + (" …" if len(partners) > 3 else "")
        if columns.is_other[column]:
            together = (together + " and " if together else "") + "the rarely called names"
        return insufficient(
            f"{format_count(stats.calls)} calls, but they rise and fall with {together}, "
            "so what each keeps cannot be told apart"
        )
    estimate, low, high = fit.estimates[column], fit.lows[column], fit.highs[column]
    share = 1.0  # of the growth after warm-up this name carries
    if fit.total_growth > 0:
        share = min(1.0, max(0.0, estimate * stats.calls / fit.total_growth))
    kept = low > 0.0 and estimate >= thresholds.attribution_min_leak_bytes
    leak = kept and share >= thresholds.attribution_min_share
    evidence = (
        f"{_interval_phrase(estimate, low, high, thresholds)} over "
        f"{format_count(stats.calls)} calls in {_processes_phrase(stats.processes)}"
    )
    if blocks is not None:
        evidence += f", {blocks:+.1f} Python blocks per call"
    if leak:
        percent = f"; {share:.0%} of the growth after warm-up" if fit.total_growth > 0 else ""
        reason = f"keeps {evidence}{percent}; a leak"
    elif kept:
        reason = (
            f"keeps {evidence}, only {share:.0%} of the growth after warm-up: the "
            "allocator placing around another name's leak, most likely; not a leak itself"
        )
    elif low > 0.0:
        floor = format_bytes(thresholds.attribution_min_leak_bytes)
        reason = f"keeps {evidence}; under the {floor} per call that matters"
    else:
        reason = f"keeps nothing for sure: {evidence}"
    return TaskAttribution(
        name,
        stats.calls,
        stats.processes,
        estimate,
        low,
        high,
        blocks,
        Verdict.LEAK if leak else Verdict.STABLE,
        reason,
    )


def _interval_phrase(
    estimate: float, low: float, high: float, thresholds: AnalysisThresholds
) -> str:
    """Return e.g. ``8.1 KiB per call (99.9% CI 7.2 to 9.0 KiB)``."""
    unit = bytes_unit(max(abs(estimate), abs(low), abs(high)))
    level = f"{thresholds.attribution_confidence * 100:g}% CI"
    lows = format_bytes(low, unit).split()[0]
    return f"{format_bytes(estimate, unit)} per call ({level} {lows} to {format_bytes(high, unit)})"


def _processes_phrase(count: int) -> str:
    """Return ``1 process`` or ``3 processes``."""
    return f"{count} process" if count == 1 else f"{count} processes"
