"""Evaluation of particle picks against ground truth, and of label masks against truth masks.

Picks are matched to truth particles one-to-one within each (tomogram, class): among all
assignments that pair the most picks with a truth particle closer than its threshold, the one
with the smallest total distance (Hungarian algorithm, solved per connected component of
candidate pairs so thousands of particles stay cheap). Scores follow the CZII cryo-ET object
identification benchmark: precision, recall and F-beta with beta = 4 (recall weighs 16x).
Picks ranked by ``score`` also get average precision and recall at 1x/2x/3x the truth count
(:mod:`cryosam_ray.ranking`).
Coordinates are voxels, ZYX; distances in voxels unless named ``_a`` (Angstrom).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cryosam_ray.ranking import (RECALL_MULTIPLES, GroupRanking, RankingReport, RankingScores, as_points,
                                 greedy_match, precision_recall_curve, score_ranks, summarise)
from cryosam_ray.tables import angstrom_to_voxels, validate_picks, validate_truth

log = logging.getLogger(__name__)

# Dense pair-count matrices up to this many cells use np.bincount; larger ones np.unique.
_MAX_DENSE_PAIRS = 2**25


@dataclass
class Counts:
    """True positives, false positives (unmatched picks) and false negatives (missed truth)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        """``tp / (tp + fp)``; with no picks: 1.0 if there was nothing to find, else 0.0."""
        if self.tp + self.fp:
            return self.tp / (self.tp + self.fp)
        return 1.0 if self.fn == 0 else 0.0

    @property
    def recall(self) -> float:
        """``tp / (tp + fn)``; with no truth: 1.0 if nothing was picked, else 0.0."""
        if self.tp + self.fn:
            return self.tp / (self.tp + self.fn)
        return 1.0 if self.fp == 0 else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (0.0 when both are 0)."""
        return self.fbeta(1.0)

    def fbeta(self, beta: float = 4.0) -> float:
        """``(1 + b^2) P R / (b^2 P + R)``; 0.0 when the denominator is 0. beta=4 as in CZII."""
        p, r, b2 = self.precision, self.recall, beta * beta
        denominator = b2 * p + r
        return (1 + b2) * p * r / denominator if denominator else 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def to_dict(self, beta: float = 4.0) -> dict:
        """``{"tp", "fp", "fn", "precision", "recall", "f1", "fbeta"}`` (plain Python numbers)."""
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1, "fbeta": self.fbeta(beta)}


@dataclass
class PickingReport:
    """Counts per class (summed over tomograms), per tomogram (summed over classes), per
    (tomogram, class) and overall (micro-averaged: the sum of all counts); ``ranking``: the
    score-ranked metrics of the same scopes (:class:`~cryosam_ray.ranking.RankingReport`);
    ``match``: the match distance rule (``{"distance_vox": d}``, ``{"distance_a": d}`` or
    ``{"radius_fraction": f}``); ``curves``: per class, the precision-recall curve of its picks
    ranked by score over all tomograms (:func:`~cryosam_ray.ranking.precision_recall_curve`)."""

    per_class: dict[str, Counts]
    per_tomogram: dict[str, Counts]
    per_tomogram_class: dict[tuple[str, str], Counts]
    overall: Counts
    beta: float = 4.0
    ranking: RankingReport | None = None
    match: dict | None = None
    curves: dict[str, dict] | None = None

    def to_json(self) -> dict:
        """``{"per_class": {CLASS: metrics}, "per_tomogram": {TOMOGRAM: metrics}, "overall": metrics}``
        where metrics is :meth:`Counts.to_dict` plus, with a ranking,
        :meth:`~cryosam_ray.ranking.RankingScores.to_dict` (``ap``, ``recall_at_1x`` ...); then
        also ``"ranked_by": "score" | "table order"``; with a match rule ``"match"`` (plus
        ``"beta"``) and with curves ``"pr_curve": {CLASS: curve}``."""
        rk = self.ranking
        out = {"per_class": {k: self._metrics(c, rk.per_class[k] if rk else None)
                             for k, c in self.per_class.items()},
               "per_tomogram": {k: self._metrics(c, rk.per_tomogram[k] if rk else None)
                                for k, c in self.per_tomogram.items()},
               "overall": self._metrics(self.overall, rk.overall if rk else None)}
        if rk is not None:
            out["ranked_by"] = rk.ranked_by
        if self.match is not None:
            out["match"] = {**self.match, "beta": self.beta}
        if self.curves is not None:
            out["pr_curve"] = self.curves
        return out

    def _metrics(self, counts: Counts, ranked: RankingScores | None) -> dict:
        metrics = counts.to_dict(self.beta)
        if ranked is not None:
            metrics.update(ranked.to_dict())
        return metrics

    def format_table(self) -> str:
        """An aligned text table: one row per class, one per tomogram, and the overall row
        (with a ranking, also ``ap`` and recall at 1x/2x/3x the truth count, ``r@1x`` ...)."""
        rows = [("class", k, c) for k, c in self.per_class.items()]
        rows += [("tomogram", k, c) for k, c in self.per_tomogram.items()]
        rows.append(("overall", "all", self.overall))
        header = ("scope", "name", "tp", "fp", "fn", "precision", "recall", "f1", f"f{self.beta:g}")
        cells = [header] + [(scope, str(name), str(c.tp), str(c.fp), str(c.fn), f"{c.precision:.4f}",
                             f"{c.recall:.4f}", f"{c.f1:.4f}", f"{c.fbeta(self.beta):.4f}")
                            for scope, name, c in rows]
        if self.ranking is not None:
            header += ("ap", *(f"r@{m}x" for m in RECALL_MULTIPLES))
            scopes = {"class": self.ranking.per_class, "tomogram": self.ranking.per_tomogram}
            for i, (scope, name, _) in enumerate(rows, start=1):
                r = self.ranking.overall if scope == "overall" else scopes[scope][name]
                cells[i] += ("-" if np.isnan(r.ap) else f"{r.ap:.4f}",
                             *(f"{r.recall_at(m):.4f}" for m in RECALL_MULTIPLES))
            cells[0] = header
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                 for row in cells]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines + self._legend())

    def _legend(self) -> list[str]:
        """What the columns mean, and when a pick counts as found."""
        rule = self.match or {}
        if "distance_vox" in rule:
            within = f"within {rule['distance_vox']:g} voxels"
        elif "distance_a" in rule:
            within = f"within {rule['distance_a']:g} A"
        else:
            within = f"within {rule.get('radius_fraction', 0.5):g} x the true particle's radius"
        lines = ["", f"A pick is a true positive (tp) when it is matched one-to-one to a true particle of its class "
                 f"{within};", "fp: picks matched to none; fn: true particles no pick matched; precision = tp / "
                 f"(tp + fp), recall = tp / (tp + fn), f1 their harmonic mean, f{self.beta:g} weighs recall "
                 f"{self.beta:g}x."]
        if self.ranking is not None:
            lines.append("With picks ranked by score: ap = average precision; r@kx = recall of the best k x "
                         "(number of true particles) picks.")
        return lines


def match_points(pred_zyx: np.ndarray, truth_zyx: np.ndarray, max_dist) -> list[tuple[int, int]]:
    """One-to-one matching of predicted to truth points within a distance.

    Maximises the number of pairs closer than (or at) ``max_dist``, then minimises their total
    Euclidean distance (Hungarian algorithm per connected component of candidate pairs).

    Args:
        pred_zyx: (N, 3) float, predicted points (voxels, ZYX).
        truth_zyx: (M, 3) float, truth points (same units).
        max_dist: a float, or (M,) floats: the threshold of each truth point.

    Returns:
        ``[(i_pred, j_truth), ...]`` sorted by ``i_pred``.

    Raises:
        ValueError: wrong shapes, non-finite coordinates or negative thresholds.
    """
    pred = as_points(pred_zyx, "pred_zyx")
    truth = as_points(truth_zyx, "truth_zyx")
    n, m = len(pred), len(truth)
    try:
        radius = np.broadcast_to(np.asarray(max_dist, dtype=np.float64), (m,))
    except ValueError as err:
        raise ValueError(f"max_dist must be a float or ({m},) array, got shape {np.shape(max_dist)}") from err
    if np.any(~np.isfinite(radius) | (radius < 0)):
        raise ValueError("max_dist must be finite and >= 0")
    if n == 0 or m == 0:
        return []
    neighbours = cKDTree(pred).query_ball_point(truth, r=radius)
    lengths = np.fromiter((len(a) for a in neighbours), dtype=np.int64, count=m)
    if not lengths.sum():
        return []
    jj = np.repeat(np.arange(m), lengths)
    ii = np.concatenate([np.asarray(a, dtype=np.int64) for a in neighbours if len(a)])
    dist = np.linalg.norm(pred[ii] - truth[jj], axis=1)
    keep = dist <= radius[jj]
    ii, jj, dist = ii[keep], jj[keep], dist[keep]
    if not ii.size:
        return []
    graph = coo_matrix((np.ones(ii.size), (ii, n + jj)), shape=(n + m, n + m))
    _, component = connected_components(graph, directed=False)
    edge_comp = component[ii]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    pairs: list[tuple[int, int]] = []
    for edges in np.split(order, bounds):
        if edges.size == 1:
            pairs.append((int(ii[edges[0]]), int(jj[edges[0]])))
            continue
        preds, p_idx = np.unique(ii[edges], return_inverse=True)
        truths, t_idx = np.unique(jj[edges], return_inverse=True)
        # A non-candidate pair costs more than all candidates together, so the optimum first
        # maximises the number of candidate pairs, then minimises their total distance.
        big = dist[edges].sum() + 1.0
        cost = np.full((preds.size, truths.size), big)
        cost[p_idx, t_idx] = dist[edges]
        candidate = np.zeros(cost.shape, dtype=bool)
        candidate[p_idx, t_idx] = True
        rows, cols = linear_sum_assignment(cost)
        ok = candidate[rows, cols]
        pairs += [(int(p), int(t)) for p, t in zip(preds[rows[ok]], truths[cols[ok]])]
    return sorted(pairs)


def evaluate_picks(truth: pa.Table, picks: pa.Table, *, distance_vox: float | None = None,
                   distance_a: float | None = None, radius_fraction: float = 0.5,
                   beta: float = 4.0) -> PickingReport:
    """Score picks against truth, matching within each (tomogram, class).

    A pick matches a truth particle closer than the threshold: by default ``radius_fraction *
    radius`` of that particle (voxels); ``distance_vox`` (voxels) or ``distance_a`` (Angstrom,
    converted with the truth's ``voxel_size_a`` column, else the picks' ``voxel_size_a``)
    override it. Picks of a class or tomogram absent from truth are all false positives; truth
    absent from picks all false negatives.

    The report's ``ranking`` ranks picks by ``score`` (higher first, NaN last, ties in table
    order; table order, with a warning, when no pick has a score) and gives, per scope, the
    non-interpolated average precision of greedy score-ordered matching with the same thresholds
    (:func:`~cryosam_ray.ranking.average_precision`; mean over classes for tomograms and
    overall) and the recall of the top 1x, 2x and 3x ``N_truth`` picks of each (tomogram, class),
    matched one-to-one as above.

    Args:
        truth: table from :func:`~cryosam_ray.tables.read_truth` (``tomogram, class, instance_id,
            z, y, x, radius[, voxel_size_a]``).
        picks: picks table (:data:`~cryosam_ray.tables.PICK_COLUMNS`).

    Raises:
        TableError: a table lacks columns. ValueError: bad thresholds, or ``distance_a`` with no
        known voxel size.
    """
    if distance_vox is not None and distance_a is not None:
        raise ValueError("give distance_vox or distance_a, not both")
    for name, value in (("distance_vox", distance_vox), ("distance_a", distance_a),
                        ("radius_fraction", radius_fraction)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    truth = validate_truth(truth)
    has_score_column = "score" in picks.column_names
    picks = validate_picks(picks)
    t_keys = list(zip(truth.column("tomogram").to_pylist(), truth.column("class").to_pylist()))
    p_keys = list(zip(picks.column("tomogram").to_pylist(), picks.column("class").to_pylist()))
    t_zyx = np.column_stack([truth.column(a).to_numpy() for a in "zyx"]) if t_keys else np.zeros((0, 3))
    p_zyx = np.column_stack([picks.column(a).to_numpy() for a in "zyx"]) if p_keys else np.zeros((0, 3))
    t_radius = truth.column("radius").to_numpy()
    t_vs = (truth.column("voxel_size_a").to_numpy() if "voxel_size_a" in truth.column_names
            else np.full(len(t_keys), np.nan))
    p_vs = picks.column("voxel_size_a").to_numpy()
    rank, ranked_by = _pick_ranks(picks.column("score").to_numpy(), has_score_column)
    groups: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for i, key in enumerate(t_keys):
        groups.setdefault(key, ([], []))[0].append(i)
    for i, key in enumerate(p_keys):
        groups.setdefault(key, ([], []))[1].append(i)

    per_tc: dict[tuple[str, str], Counts] = {}
    ranked_groups: dict[tuple[str, str], GroupRanking] = {}
    for key in sorted(groups):
        ti, pi = (np.asarray(g, dtype=np.int64) for g in groups[key])
        ranked = pi[np.argsort(rank[pi], kind="stable")]
        pairs, is_tp, found = [], np.zeros(pi.size, dtype=bool), dict.fromkeys(RECALL_MULTIPLES, 0)
        if ti.size and pi.size:
            if distance_vox is not None:
                threshold = np.full(ti.size, float(distance_vox))
            elif distance_a is not None:
                threshold = _angstrom_threshold(distance_a, t_vs[ti], p_vs[pi], key)
            else:
                threshold = radius_fraction * t_radius[ti]
            pairs = match_points(p_zyx[pi], t_zyx[ti], threshold)
            is_tp = greedy_match(p_zyx[ranked], t_zyx[ti], threshold)
            found = {m: len(pairs) if m * ti.size >= pi.size else
                     len(match_points(p_zyx[ranked[: m * ti.size]], t_zyx[ti], threshold))
                     for m in RECALL_MULTIPLES}
        per_tc[key] = Counts(len(pairs), int(pi.size) - len(pairs), int(ti.size) - len(pairs))
        ranked_groups[key] = GroupRanking(rank[ranked], is_tp, int(ti.size), found)

    per_class: dict[str, Counts] = {}
    per_tomogram: dict[str, Counts] = {}
    overall = Counts()
    for (tomo, cls), counts in per_tc.items():
        per_class[cls] = per_class.get(cls, Counts()) + counts
        per_tomogram[tomo] = per_tomogram.get(tomo, Counts()) + counts
        overall = overall + counts
    ranking = summarise(ranked_groups, ranked_by=ranked_by)
    curves = {}
    for cls in sorted({c for _, c in ranked_groups}):
        members = [g for (_, c), g in ranked_groups.items() if c == cls]
        order = np.argsort(np.concatenate([g.rank for g in members]), kind="stable")
        curves[cls] = precision_recall_curve(np.concatenate([g.is_tp for g in members])[order],
                                             sum(g.n_truth for g in members))
    match = ({"distance_vox": float(distance_vox)} if distance_vox is not None
             else {"distance_a": float(distance_a)} if distance_a is not None
             else {"radius_fraction": float(radius_fraction)})
    log.info("picking evaluation: tp=%d fp=%d fn=%d f%g=%.4f mAP=%.4f", overall.tp, overall.fp, overall.fn,
             beta, overall.fbeta(beta), ranking.overall.ap)
    return PickingReport(dict(sorted(per_class.items())), dict(sorted(per_tomogram.items())), per_tc,
                         overall, beta, ranking, match, curves)


@dataclass
class MaskReport:
    """Mask agreement. ``dice``/``iou``: foreground vs foreground. ``instance_dice``/``instance_iou``:
    mean over truth instances of the score with the predicted instance that overlaps it most
    (0 when none). ``matched``: truth instances whose best predicted instance has IoU > 0.5."""

    dice: float
    iou: float
    instance_dice: float
    instance_iou: float
    matched: int
    n_truth: int
    n_pred: int


def evaluate_masks(pred_labels: np.ndarray, truth_labels: np.ndarray) -> MaskReport:
    """Compare two (D, H, W) integer label volumes (0 = background, ids need not be contiguous).

    Both empty scores 1.0. Cost: a few passes over the volumes (bincount on pair ids), no
    per-instance loop over the full volume.

    Raises:
        ValueError: shapes differ, labels are not integers, or labels are negative.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"label volumes differ in shape: pred {pred_labels.shape} vs truth {truth_labels.shape}")
    pred, n_pred = _compact_labels(pred_labels, "pred_labels")
    truth, n_truth = _compact_labels(truth_labels, "truth_labels")
    pred_size = np.bincount(pred, minlength=n_pred + 1)
    truth_size = np.bincount(truth, minlength=n_truth + 1)
    both = (pred > 0) & (truth > 0)
    inter = int(both.sum())
    fg_pred, fg_truth = int(pred_size[1:].sum()), int(truth_size[1:].sum())
    union = fg_pred + fg_truth - inter
    dice = 2 * inter / (fg_pred + fg_truth) if fg_pred + fg_truth else 1.0
    iou = inter / union if union else 1.0

    if n_truth == 0:
        empty = 1.0 if n_pred == 0 else 0.0
        return MaskReport(dice, iou, empty, empty, 0, 0, n_pred)
    pair = truth[both].astype(np.int64) * (n_pred + 1) + pred[both]
    if (n_truth + 1) * (n_pred + 1) <= _MAX_DENSE_PAIRS:
        counts = np.bincount(pair, minlength=(n_truth + 1) * (n_pred + 1))
        pair = np.flatnonzero(counts)
        counts = counts[pair]
    else:
        pair, counts = np.unique(pair, return_counts=True)
    t_id, p_id = np.divmod(pair, n_pred + 1)
    best_ov = np.zeros(n_truth + 1, dtype=np.int64)
    best_p = np.zeros(n_truth + 1, dtype=np.int64)
    order = np.lexsort((-counts, t_id))  # by truth id, then largest overlap first
    first = np.unique(t_id[order], return_index=True)[1]
    best_ov[t_id[order][first]] = counts[order][first]
    best_p[t_id[order][first]] = p_id[order][first]
    ov = best_ov[1:].astype(np.float64)
    t_sz = truth_size[1:].astype(np.float64)
    p_sz = np.where(best_p[1:] > 0, pred_size[best_p[1:]], 0).astype(np.float64)
    inst_dice = 2 * ov / (t_sz + p_sz)
    inst_iou = ov / (t_sz + p_sz - ov)
    return MaskReport(float(dice), float(iou), float(inst_dice.mean()), float(inst_iou.mean()),
                      int((inst_iou > 0.5).sum()), n_truth, n_pred)


def _pick_ranks(scores: np.ndarray, has_score_column: bool) -> tuple[np.ndarray, str]:
    """Rank positions of the picks (:func:`~cryosam_ray.ranking.score_ranks`) and what ranked them;
    warns once when no pick has a score (then the ranking is the table order)."""
    missing = np.isnan(scores)
    ranked_by = "score"
    if scores.size and missing.all():
        ranked_by = "table order"
        log.warning("picks have no scores (%s): average precision and recall@kx rank them in table order",
                    "every score is NaN" if has_score_column else "no 'score' column")
    elif missing.any():
        log.info("%d of %d picks have no score; they rank last", int(missing.sum()), scores.size)
    return score_ranks(scores), ranked_by


def _angstrom_threshold(distance_a, truth_vs, pick_vs, key) -> np.ndarray:
    """Per-truth threshold in voxels: ``distance_a`` over the truth's voxel size, else the picks'."""
    fallback = pick_vs[np.isfinite(pick_vs) & (pick_vs > 0)]
    if fallback.size and np.ptp(fallback) > 0:
        log.warning("picks of %s have several voxel sizes %s; using %g", key, np.unique(fallback), fallback[0])
    vs = np.where(np.isfinite(truth_vs) & (truth_vs > 0), truth_vs, fallback[0] if fallback.size else np.nan)
    if not np.all(np.isfinite(vs)):
        raise ValueError(f"distance_a needs a voxel size for tomogram {key[0]!r}: the truth has no "
                         "voxel_size_a column (or it is empty) and its picks have no valid voxel_size_a")
    return angstrom_to_voxels(distance_a, vs)


def _compact_labels(labels: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Flat labels renumbered 1..K (0 stays background), and K."""
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label volume, got dtype {labels.dtype}")
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    if flat.min() < 0:
        raise ValueError(f"{name} has negative labels (min {flat.min()}); expected 0 = background, ids > 0")
    top = int(flat.max())
    if top <= 4 * flat.size + 1024:  # lookup table: linear time
        present = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[present] = np.arange(1, int(present.sum()) + 1)
        return lut[flat], int(present.sum())
    ids, inverse = np.unique(flat, return_inverse=True)
    return (inverse.reshape(-1) + (0 if ids[0] == 0 else 1)).astype(np.int64), int(np.count_nonzero(ids))
