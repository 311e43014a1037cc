"""Score-ranked picking metrics: average precision and recall at a multiple of the truth count.

Picks are ranked by ``score`` (higher first; NaN last; ties keep table order). Within each
(tomogram, class), picks are walked in rank order and each one claims the nearest truth
particle within its threshold that no better-ranked pick has claimed (greedy, as in PASCAL VOC
and COCO detection); it is a true positive if it claims one. Average precision is computed from
those flags (:func:`average_precision`). Recall at ``m`` x keeps the ``m * N_truth`` best picks of
each (tomogram, class) and matches them one-to-one like the F1 (see
:func:`cryosam_ray.evaluate.evaluate_picks`); it is how a picker is judged against a partial
annotation, where precision is only a lower bound. Coordinates are voxels, ZYX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

# Recall is reported for the top m * N_truth picks of each (tomogram, class), for each m here.
RECALL_MULTIPLES = (1, 2, 3)


def score_ranks(scores) -> np.ndarray:
    """Rank position of each pick (0 = best): higher score first, NaN last, ties in table order.

    Args:
        scores: (N,) float scores in table order.

    Returns:
        (N,) int64, a permutation of ``0..N-1``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    missing = np.isnan(scores)
    order = np.lexsort((np.arange(scores.size), np.where(missing, 0.0, -scores), missing))
    ranks = np.empty(scores.size, dtype=np.int64)
    ranks[order] = np.arange(scores.size)
    return ranks


def greedy_match(pred_zyx, truth_zyx, max_dist) -> np.ndarray:
    """Which picks, walked in the given (rank) order, claim a truth particle.

    Each pick claims the nearest (Euclidean) truth point that is within that point's threshold
    (closer than or at) and not claimed by an earlier pick; ties in distance go to the lower
    truth index. A pick that claims nothing is a false positive.

    Args:
        pred_zyx: (N, 3) float, picks in rank order (voxels, ZYX).
        truth_zyx: (M, 3) float, truth points (same units).
        max_dist: a float, or (M,) floats: the threshold of each truth point.

    Returns:
        (N,) bool, True where the pick is a true positive.

    Raises:
        ValueError: wrong shapes, non-finite coordinates or negative thresholds.
    """
    pred, truth = as_points(pred_zyx, "pred_zyx"), as_points(truth_zyx, "truth_zyx")
    n, m = len(pred), len(truth)
    try:
        radius = np.broadcast_to(np.asarray(max_dist, dtype=np.float64), (m,))
    except ValueError as err:
        raise ValueError(f"max_dist must be a float or ({m},) array, got shape {np.shape(max_dist)}") from err
    if np.any(~np.isfinite(radius) | (radius < 0)):
        raise ValueError("max_dist must be finite and >= 0")
    is_tp = np.zeros(n, dtype=bool)
    if n == 0 or m == 0:
        return is_tp
    neighbours = cKDTree(pred).query_ball_point(truth, r=radius)
    lengths = np.fromiter((len(a) for a in neighbours), dtype=np.int64, count=m)
    if not lengths.sum():
        return is_tp
    jj = np.repeat(np.arange(m), lengths)
    ii = np.concatenate([np.asarray(a, dtype=np.int64) for a in neighbours if len(a)])
    dist = np.linalg.norm(pred[ii] - truth[jj], axis=1)
    keep = dist <= radius[jj]
    ii, jj, dist = ii[keep], jj[keep], dist[keep]
    claimed = np.zeros(m, dtype=bool)
    # By pick rank, then distance: a pick's first free candidate is its nearest unclaimed truth.
    order = np.lexsort((jj, dist, ii))
    for i, j in zip(ii[order].tolist(), jj[order].tolist()):
        if not (is_tp[i] or claimed[j]):
            is_tp[i] = claimed[j] = True
    return is_tp


def average_precision(is_tp, n_truth: int) -> float:
    """Non-interpolated average precision of a ranking.

    ``AP = (1 / n_truth) * sum over true positives at rank k of precision@k`` (precision@k = true
    positives among the first k picks / k). This is sklearn's ``average_precision_score`` (which
    is not interpolated, unlike PASCAL VOC's and COCO's precision envelope) on the picks' flags
    with strictly decreasing scores, times ``found / n_truth``: truth particles no pick found
    count as never retrieved, so recall runs against all of the truth.

    Args:
        is_tp: (N,) bool, the picks in rank order (best first).
        n_truth: number of truth particles.

    Returns:
        AP in [0, 1]; NaN when ``n_truth`` is 0 (undefined).

    Raises:
        ValueError: more true positives than truth particles.
    """
    is_tp = np.asarray(is_tp, dtype=bool).reshape(-1)
    hits = np.cumsum(is_tp)
    if hits.size and hits[-1] > n_truth:
        raise ValueError(f"{hits[-1]} true positives but only {n_truth} truth particles")
    if n_truth == 0:
        return math.nan
    precision_at_hits = hits[is_tp] / (np.flatnonzero(is_tp) + 1.0)
    return float(precision_at_hits.sum() / n_truth)


def precision_recall_curve(is_tp, n_truth: int, *, max_points: int = 200) -> dict:
    """Precision and recall after each of the first k ranked picks, k = 1..N.

    Args:
        is_tp: (N,) bool, the picks in rank order (best first).
        n_truth: number of truth particles (recall's denominator).
        max_points: at most this many points are kept (evenly spaced ranks, the last always).

    Returns:
        ``{"rank": [k ...], "precision": [...], "recall": [...], "n_truth": n_truth}`` as plain
        Python numbers; recall is 0 everywhere when ``n_truth`` is 0; empty lists with no picks.
    """
    is_tp = np.asarray(is_tp, dtype=bool).reshape(-1)
    hits = np.cumsum(is_tp)
    ranks = np.arange(1, is_tp.size + 1)
    keep = np.unique(np.linspace(0, is_tp.size - 1, min(is_tp.size, max(2, int(max_points)))).round().astype(int))
    keep = keep[keep < is_tp.size]
    recall = hits[keep] / n_truth if n_truth else np.zeros(keep.size)
    return {"rank": ranks[keep].tolist(), "precision": np.round(hits[keep] / ranks[keep], 6).tolist(),
            "recall": np.round(recall, 6).tolist(), "n_truth": int(n_truth)}


@dataclass
class GroupRanking:
    """The ranked picks of one (tomogram, class), as :func:`summarise` needs them."""

    rank: np.ndarray  # (K,) int64: the picks' global rank positions, ascending
    is_tp: np.ndarray  # (K,) bool: greedy matching in that order
    n_truth: int
    found: dict[int, int]  # m -> truth matched by the top m * n_truth picks (one-to-one)


@dataclass
class RankingScores:
    """Score-ranked metrics of one scope (a (tomogram, class), a class, a tomogram, or all).

    ``ap``: for a (tomogram, class), the AP of its ranking; for a class, the AP of the ranking
    of its picks over all tomograms; for a tomogram and overall, the mean AP over classes with
    truth (mAP). NaN when there is no truth. ``found[m]``: truth particles matched by the top
    ``m * N_truth`` picks of each (tomogram, class) in the scope.
    """

    ap: float
    n_truth: int
    found: dict[int, int] = field(default_factory=lambda: dict.fromkeys(RECALL_MULTIPLES, 0))

    def recall_at(self, multiple: int) -> float:
        """``found[m] / n_truth``; with no truth no pick is kept and nothing is missed: 1.0."""
        return self.found[multiple] / self.n_truth if self.n_truth else 1.0

    def to_dict(self) -> dict:
        """``{"ap", "recall_at_1x", "recall_at_2x", "recall_at_3x"}``; ``ap`` None when undefined."""
        out = {"ap": None if math.isnan(self.ap) else self.ap}
        out.update({f"recall_at_{m}x": self.recall_at(m) for m in sorted(self.found)})
        return out


@dataclass
class RankingReport:
    """:class:`RankingScores` per class, per tomogram, per (tomogram, class) and overall.

    ``ranked_by``: ``"score"``, or ``"table order"`` when the picks had no scores.
    """

    per_class: dict[str, RankingScores]
    per_tomogram: dict[str, RankingScores]
    per_tomogram_class: dict[tuple[str, str], RankingScores]
    overall: RankingScores
    ranked_by: str = "score"


def summarise(groups: dict[tuple[str, str], GroupRanking], *, ranked_by: str = "score") -> RankingReport:
    """Aggregate per-(tomogram, class) rankings: recall counts are summed; a class's AP is that
    of its picks over all tomograms ranked together; tomograms and overall get the mean over
    classes (with truth) of the class-level AP."""
    per_tc = {key: RankingScores(average_precision(g.is_tp, g.n_truth), g.n_truth, dict(g.found))
              for key, g in groups.items()}
    per_class: dict[str, RankingScores] = {}
    for cls in sorted({c for _, c in groups}):
        members = [g for (_, c), g in groups.items() if c == cls]
        rank = np.concatenate([g.rank for g in members])
        is_tp = np.concatenate([g.is_tp for g in members])[np.argsort(rank, kind="stable")]
        n_truth = sum(g.n_truth for g in members)
        per_class[cls] = RankingScores(average_precision(is_tp, n_truth), n_truth, _sum_found(members))
    per_tomogram = {}
    for tomo in sorted({t for t, _ in groups}):
        members = {key: s for key, s in per_tc.items() if key[0] == tomo}
        per_tomogram[tomo] = RankingScores(_mean_ap(members.values()), sum(s.n_truth for s in members.values()),
                                           _sum_found(members.values()))
    overall = RankingScores(_mean_ap(per_class.values()), sum(s.n_truth for s in per_class.values()),
                            _sum_found(per_class.values()))
    return RankingReport(per_class, per_tomogram, per_tc, overall, ranked_by)


def _mean_ap(scores) -> float:
    values = [s.ap for s in scores if s.n_truth]
    return float(np.mean(values)) if values else math.nan


def _sum_found(items) -> dict[int, int]:
    return {m: sum(item.found[m] for item in items) for m in RECALL_MULTIPLES}


def as_points(values, name: str) -> np.ndarray:
    """``values`` as (N, 3) float64 ZYX points; ValueError naming ``name`` if not finite points."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) (z, y, x), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite coordinates")
    return arr
