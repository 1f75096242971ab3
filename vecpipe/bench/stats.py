"""Pure helpers of the benchmarks: percentiles, recall, targets and synthetic vectors.

Nothing here touches the network, so every function is unit-tested on its own
(``tests/unit/test_bench.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "Target",
    "cluster_centers",
    "clustered_unit_vectors",
    "exact_top_k",
    "latency_summary",
    "percentile",
    "random_unit_vectors",
    "rate",
    "ratio",
    "recall_at_k",
    "split_halves",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    The same definition as ``numpy.percentile``'s default, so figures can be checked by hand.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50/p95/p99/mean/max in milliseconds (rounded to 0.01 ms) and the sample count."""
    if not seconds:
        return {"n": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(sum(ms) / len(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def recall_at_k(found: Sequence[Iterable[int]], truth: Sequence[Iterable[int]], k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / min(k, |truth|).

    A query whose exact answer is empty counts as fully recalled (there was nothing to find).
    """
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} results for {len(truth)} queries")
    if not truth:
        raise ValueError("recall of no queries")
    total = 0.0
    for got, want in zip(found, truth, strict=True):
        want_k = list(want)[:k]
        if not want_k:
            total += 1.0
            continue
        total += len(set(list(got)[:k]) & set(want_k)) / len(want_k)
    return total / len(truth)


def rate(count: int, seconds: float) -> float:
    """Items per second, 0 for an empty or instantaneous run."""
    return count / seconds if seconds > 0 else 0.0


def ratio(measured: float, limit: float) -> float:
    """``measured / limit`` rounded to three places; 0 when the limit is 0."""
    return round(measured / limit, 3) if limit > 0 else 0.0


def split_halves(n: int) -> tuple[slice, slice]:
    """Two slices covering ``range(n)``: a limit measured half before and half after the
    pipeline brackets it in time, so a load that drifts during the run weighs on both sides."""
    mid = n // 2
    return slice(0, mid), slice(mid, n)


@dataclass(frozen=True)
class Target:
    """A goal for one figure: ``op`` is ">=" or "<=" (or "<", ">") and ``value`` the bound."""
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<=", ">", "<"):
            raise ValueError(f"unknown comparison {self.op!r}")

    def met(self, measured: float | None) -> bool:
        """True when ``measured`` satisfies the goal (None never does)."""
        if measured is None or math.isnan(measured):
            return False
        return {
            ">=": measured >= self.value,
            "<=": measured <= self.value,
            ">": measured > self.value,
            "<": measured < self.value,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


def _unit_rows(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: npt.NDArray[np.float32] = (x / norms).astype(np.float32)
    return out


def random_unit_vectors(n: int, dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """``n`` directions drawn uniformly on the unit sphere (float32, shape (n, dim))."""
    rng = np.random.default_rng(seed)
    return _unit_rows(rng.standard_normal((n, dim)))


def cluster_centers(clusters: int, dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """The centres that :func:`clustered_unit_vectors` draws around for ``seed``."""
    return random_unit_vectors(clusters, dim, seed=seed + 7919)


def clustered_unit_vectors(
    n: int, dim: int, clusters: int, spread: float = 1.0, seed: int = 0,
    centers: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Unit vectors gathered around ``clusters`` random centres, like the embeddings of topics.

    Each point is its centre plus Gaussian noise of norm about ``spread`` (so a point's cosine
    to its centre is about ``1 / sqrt(1 + spread**2)``), renormalized. Returns the vectors and
    each one's cluster. The centres are ``cluster_centers(clusters, dim, seed)`` unless given:
    pass the data's centres with another seed to draw queries from the same distribution.
    """
    if clusters < 1:
        raise ValueError("clusters must be at least 1")
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = cluster_centers(clusters, dim, seed)
    if centers.shape != (clusters, dim):
        raise ValueError(f"centers have shape {centers.shape}, expected {(clusters, dim)}")
    labels = rng.integers(0, clusters, size=n)
    noise = rng.standard_normal((n, dim)) * (spread / math.sqrt(dim))
    return _unit_rows(centers[labels].astype(np.float64) + noise), labels


def exact_top_k(
    data: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int,
    metric: str = "cosine", block: int = 65_536,
) -> list[list[int]]:
    """Row indices of the ``k`` nearest rows of ``data`` for each query, nearest first.

    Brute force in blocks of ``block`` rows (memory stays at queries x block). ``cosine`` and
    ``ip`` rank by inner product (the rows are unit vectors for cosine), ``l2`` by distance.
    """
    if metric not in ("cosine", "ip", "l2"):
        raise ValueError(f"unknown metric {metric!r}")
    n = data.shape[0]
    k = min(k, n)
    if k == 0:
        return [[] for _ in range(len(queries))]
    best_idx = np.zeros((len(queries), 0), dtype=np.int64)
    best_score = np.zeros((len(queries), 0), dtype=np.float32)
    q = queries.astype(np.float32)
    if metric == "cosine":
        q = _unit_rows(q.astype(np.float64))
    for start in range(0, n, block):
        part = data[start:start + block]
        if metric == "l2":
            # Smaller distance is better; rank by the negated squared distance.
            score = -((q ** 2).sum(1)[:, None] - 2 * q @ part.T + (part ** 2).sum(1)[None, :])
        else:
            score = q @ part.T
        idx = np.broadcast_to(np.arange(start, start + len(part)), score.shape)
        best_score = np.concatenate([best_score, score.astype(np.float32)], axis=1)
        best_idx = np.concatenate([best_idx, idx], axis=1)
        if best_score.shape[1] > k:
            keep = np.argpartition(-best_score, k - 1, axis=1)[:, :k]
            best_score = np.take_along_axis(best_score, keep, axis=1)
            best_idx = np.take_along_axis(best_idx, keep, axis=1)
    order = np.argsort(-best_score, axis=1, kind="stable")
    return np.take_along_axis(best_idx, order, axis=1).tolist()  # type: ignore[no-any-return]
