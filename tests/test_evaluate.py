"""Evaluation: one-to-one matching, precision / recall / F-beta, and mask scores."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pyarrow as pa
import pytest

from cryosam_ray.cli import main
from cryosam_ray.evaluate import Counts, evaluate_masks, evaluate_picks, match_points
from cryosam_ray.ranking import average_precision, greedy_match, precision_recall_curve, score_ranks
from cryosam_ray.tables import picks_table, write_picks

RADIUS = 6.0  # voxels; default threshold = 0.5 * radius = 3 voxels


def make_truth(n: int = 40, *, seed: int = 0, tomograms=("TS_01",), classes=("ribosome",),
               voxel_size_a: float | None = 10.0) -> pa.Table:
    """Truth particles on a coarse grid (>= 20 voxels apart) so thresholds never overlap."""
    rng = np.random.default_rng(seed)
    rows = []
    for tomo in tomograms:
        for cls in classes:
            cells = rng.choice(10 * 10 * 10, size=n, replace=False)
            for k, cell in enumerate(cells):
                z, y, x = np.unravel_index(cell, (10, 10, 10))
                row = {"tomogram": tomo, "class": cls, "instance_id": k + 1, "z": 20.0 * z + 5,
                       "y": 20.0 * y + 5, "x": 20.0 * x + 5, "radius": RADIUS}
                if voxel_size_a is not None:
                    row["voxel_size_a"] = voxel_size_a
                rows.append(row)
    return pa.Table.from_pylist(rows)


def as_picks(truth: pa.Table, shift=(0.0, 0.0, 0.0), keep=None, voxel_size_a: float = 10.0) -> pa.Table:
    rows = truth.to_pylist()
    if keep is not None:
        rows = [r for i, r in enumerate(rows) if keep(i)]
    return picks_table([{"tomogram": r["tomogram"], "class": r["class"], "z": r["z"] + shift[0],
                         "y": r["y"] + shift[1], "x": r["x"] + shift[2], "voxel_size_a": voxel_size_a,
                         "score": 1.0} for r in rows])


# ------------------------------------------------------------------ Counts

def test_counts_definitions():
    c = Counts(tp=3, fp=1, fn=2)
    assert c.precision == 0.75 and c.recall == 0.6
    assert c.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert c.fbeta(4) == pytest.approx(17 * 0.75 * 0.6 / (16 * 0.75 + 0.6))
    assert Counts(0, 0, 5).precision == 0.0 and Counts(0, 0, 5).f1 == 0.0
    assert Counts(0, 0, 0).precision == 1.0 and Counts(0, 0, 0).recall == 1.0
    assert Counts(0, 4, 0).recall == 0.0 and Counts(0, 4, 0).fbeta() == 0.0
    assert Counts(1, 2, 3) + Counts(4, 5, 6) == Counts(5, 7, 9)


# ------------------------------------------------------------------ evaluate_picks

def test_truth_against_itself_is_perfect():
    truth = make_truth()
    report = evaluate_picks(truth, as_picks(truth))
    assert report.overall == Counts(40, 0, 0)
    assert report.overall.f1 == 1.0 and report.overall.fbeta() == 1.0


def test_shift_beyond_threshold_gives_no_tp():
    truth = make_truth()
    report = evaluate_picks(truth, as_picks(truth, shift=(3.5, 0.0, 0.0)))
    assert report.overall == Counts(0, 40, 40)
    assert report.overall.f1 == 0.0


def test_shift_within_threshold_stays_perfect():
    truth = make_truth()
    report = evaluate_picks(truth, as_picks(truth, shift=(1.5, -1.5, 1.5)))  # 2.6 voxels < 3
    assert report.overall == Counts(40, 0, 0) and report.overall.f1 == 1.0


def test_thinned_copy():
    truth = make_truth()
    report = evaluate_picks(truth, as_picks(truth, keep=lambda i: i % 2 == 0))
    c = report.overall
    assert (c.tp, c.fp, c.fn) == (20, 0, 20)
    assert c.recall == 0.5 and c.precision == 1.0
    assert c.f1 == 2 / 3
    assert c.fbeta(4) == (17 * 0.5) / (16 * 1 + 0.5)


def test_extra_random_picks_lower_precision():
    truth = make_truth()
    rng = np.random.default_rng(5)
    extra = picks_table([{"tomogram": "TS_01", "class": "ribosome", "z": 15.0 + float(rng.uniform(-1, 1)),
                          "y": 15.0, "x": 15.0 + 20.0 * k} for k in range(10)])  # between grid points
    picks = pa.concat_tables([as_picks(truth), extra])
    c = evaluate_picks(truth, picks).overall
    assert (c.tp, c.fp, c.fn) == (40, 10, 0)
    assert c.precision == 40 / 50 and c.recall == 1.0


def test_one_to_one_two_picks_one_truth():
    truth = make_truth(1)
    picks = pa.concat_tables([as_picks(truth, shift=(1.0, 0, 0)), as_picks(truth, shift=(0, -1.0, 0))])
    assert evaluate_picks(truth, picks).overall == Counts(1, 1, 0)


def test_hungarian_beats_greedy():
    # Greedy (closest pair first) takes pick 0 <-> truth 0 (distance 0.5), leaving pick 1 out of
    # range of truth 1. The optimum pairs pick 0 <-> truth 1 and pick 1 <-> truth 0.
    truth = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.5]])
    pred = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, -2.5]])
    assert sorted(match_points(pred, truth, 3.0)) == [(0, 1), (1, 0)]
    table_truth = pa.Table.from_pylist([{"tomogram": "t", "class": "c", "instance_id": i + 1, "z": p[0],
                                         "y": p[1], "x": p[2], "radius": 6.0} for i, p in enumerate(truth)])
    picks = picks_table([{"tomogram": "t", "class": "c", "z": p[0], "y": p[1], "x": p[2]} for p in pred])
    assert evaluate_picks(table_truth, picks).overall == Counts(2, 0, 0)


def test_match_points_minimises_distance_and_thresholds_per_truth():
    truth = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    pred = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    assert match_points(pred, truth, 5.0) == [(0, 0), (1, 1)]  # total 2 beats the crossed total 6
    assert match_points(pred, truth, np.array([0.5, 1.0])) == [(1, 1)]
    assert match_points(np.zeros((0, 3)), truth, 1.0) == []
    with pytest.raises(ValueError, match="shape"):
        match_points(np.zeros((2, 2)), truth, 1.0)


def test_match_points_scales_to_thousands():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 300, size=(2500, 3))
    pred = np.concatenate([truth + rng.normal(0, 0.7, truth.shape), rng.uniform(0, 300, (1000, 3))])
    start = time.perf_counter()
    pairs = match_points(pred, truth, 3.0)
    assert time.perf_counter() - start < 20
    assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})
    assert len(pairs) >= 2400
    d = np.linalg.norm(pred[[i for i, _ in pairs]] - truth[[j for _, j in pairs]], axis=1)
    assert np.all(d <= 3.0)


def test_per_class_and_per_tomogram_split():
    truth = make_truth(10, tomograms=("TS_01", "TS_02"), classes=("ribosome", "ferritin"))
    # TS_01: everything; TS_02: ribosome only; plus a class and a tomogram absent from truth.
    picks = as_picks(truth, keep=lambda i: i < 30)
    picks = pa.concat_tables([picks, picks_table([
        {"tomogram": "TS_01", "class": "virus", "z": 1.0, "y": 1.0, "x": 1.0},
        {"tomogram": "TS_99", "class": "ribosome", "z": 1.0, "y": 1.0, "x": 1.0}])])
    report = evaluate_picks(truth, picks)
    assert report.per_tomogram_class[("TS_01", "ribosome")] == Counts(10, 0, 0)
    assert report.per_tomogram_class[("TS_02", "ferritin")] == Counts(0, 0, 10)
    assert report.per_tomogram_class[("TS_01", "virus")] == Counts(0, 1, 0)
    assert report.per_class["ribosome"] == Counts(20, 1, 0)
    assert report.per_class["ferritin"] == Counts(10, 0, 10)
    assert report.per_class["virus"] == Counts(0, 1, 0)
    assert report.per_tomogram["TS_01"] == Counts(20, 1, 0)
    assert report.per_tomogram["TS_02"] == Counts(10, 0, 10)
    assert report.per_tomogram["TS_99"] == Counts(0, 1, 0)
    assert report.overall == Counts(30, 2, 10)


def test_distance_overrides_and_angstrom_conversion():
    truth = make_truth(voxel_size_a=10.0)
    shifted = as_picks(truth, shift=(4.0, 0.0, 0.0))  # 4 voxels = 40 Angstrom
    assert evaluate_picks(truth, shifted).overall.tp == 0  # default 3 voxels
    assert evaluate_picks(truth, shifted, distance_vox=4.5).overall.tp == 40
    assert evaluate_picks(truth, shifted, distance_a=45.0).overall.tp == 40
    assert evaluate_picks(truth, shifted, distance_a=35.0).overall.tp == 0
    assert evaluate_picks(truth, shifted, radius_fraction=0.7).overall.tp == 40
    # no voxel size in truth: the picks' voxel size is used (5 A/voxel -> 45 A = 9 voxels)
    truth_nv = make_truth(voxel_size_a=None)
    assert evaluate_picks(truth_nv, as_picks(truth_nv, (8.0, 0, 0), voxel_size_a=5.0), distance_a=45.0).overall.tp == 40
    no_size = as_picks(truth_nv, voxel_size_a=math.nan)
    with pytest.raises(ValueError, match="voxel size"):
        evaluate_picks(truth_nv, no_size, distance_a=45.0)
    with pytest.raises(ValueError, match="not both"):
        evaluate_picks(truth, shifted, distance_vox=1.0, distance_a=1.0)


def test_report_to_json_and_table():
    truth = make_truth(10, tomograms=("TS_01", "TS_02"))
    report = evaluate_picks(truth, as_picks(truth, keep=lambda i: i % 2 == 0))
    data = report.to_json()
    assert set(data) == {"per_class", "per_tomogram", "overall", "ranked_by", "match", "pr_curve"}
    assert data["match"] == {"radius_fraction": 0.5, "beta": 4.0}
    curve = data["pr_curve"]["ribosome"]
    assert curve["n_truth"] == 20 and curve["rank"][-1] == 10 and curve["recall"][-1] == 0.5
    assert curve["precision"] == [1.0] * len(curve["rank"])
    metric_keys = {"tp", "fp", "fn", "precision", "recall", "f1", "fbeta", "ap", "recall_at_1x", "recall_at_2x",
                   "recall_at_3x"}
    assert set(data["overall"]) == metric_keys
    assert set(data["per_class"]) == {"ribosome"} and set(data["per_class"]["ribosome"]) == metric_keys
    assert set(data["per_tomogram"]) == {"TS_01", "TS_02"}
    assert data["overall"]["recall"] == 0.5 and data["overall"]["tp"] == 10
    text = report.format_table()
    table, legend = text.split("\n\n")
    assert "within 0.5 x the true particle's radius" in legend and "ap = average precision" in legend
    lines = table.splitlines()
    assert lines[0].split() == ["scope", "name", "tp", "fp", "fn", "precision", "recall", "f1", "f4", "ap",
                                "r@1x", "r@2x", "r@3x"]
    assert any(line.startswith("class") and "ribosome" in line for line in lines)
    assert sum(line.startswith("tomogram") for line in lines) == 2
    assert lines[-1].startswith("overall") and "0.5000" in lines[-1]
    assert len({len(line) for line in lines if not line.startswith("-")}) == 1  # aligned


# ------------------------------------------------------------------ ranking: AP and recall@kx

def points_truth(points: dict[tuple[str, str], list], radius: float = RADIUS) -> pa.Table:
    """Truth rows from ``{(tomogram, class): [(z, y, x), ...]}``."""
    return pa.Table.from_pylist([{"tomogram": t, "class": c, "instance_id": k + 1, "z": float(p[0]),
                                  "y": float(p[1]), "x": float(p[2]), "radius": radius}
                                 for (t, c), pts in points.items() for k, p in enumerate(pts)])


def scored_picks(rows) -> pa.Table:
    """Picks from ``[(tomogram, class, (z, y, x), score), ...]`` in table order."""
    return picks_table([{"tomogram": t, "class": c, "z": float(p[0]), "y": float(p[1]), "x": float(p[2]),
                         "score": score} for t, c, p, score in rows])


A, B, C = (10.0, 10.0, 10.0), (10.0, 10.0, 50.0), (10.0, 50.0, 10.0)
FAR = (80.0, 80.0, 80.0)


def _near(point, dz=0.0, dy=0.0, dx=0.0):
    return (point[0] + dz, point[1] + dy, point[2] + dx)


def test_score_ranks_nan_last_ties_in_table_order():
    ranks = score_ranks([0.5, math.nan, 0.9, 0.5, math.nan, -math.inf])
    # best first: 0.9 (row 2), 0.5 (row 0), 0.5 (row 3), -inf (row 5), NaN (row 1), NaN (row 4)
    assert ranks.tolist() == [1, 4, 0, 2, 5, 3]
    assert score_ranks([]).tolist() == []


def test_greedy_match_nearest_unclaimed_truth():
    truth = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    # Pick 0 lies between both (1.2 from truth 0, 0.8 from truth 1): it claims the nearer, truth 1.
    # Pick 1 then finds truth 1 taken and claims truth 0; pick 2 finds nothing free.
    pred = np.array([[0.0, 0.0, 1.2], [0.0, 0.0, 1.9], [0.0, 0.0, 0.1]])
    assert greedy_match(pred, truth, 3.0).tolist() == [True, True, False]
    # Per-truth thresholds: truth 1 only accepts picks within 0.5, so pick 0 claims truth 0.
    assert greedy_match(pred, truth, np.array([3.0, 0.5])).tolist() == [True, True, False]
    assert greedy_match(pred[:1], truth, np.array([3.0, 0.5])).tolist() == [True]
    assert greedy_match(np.zeros((0, 3)), truth, 1.0).tolist() == []
    with pytest.raises(ValueError, match="max_dist"):
        greedy_match(pred, truth, np.array([1.0, 2.0, 3.0]))


def test_average_precision_hand_worked():
    # 3 truth particles A, B, C (threshold 3 voxels); 5 picks in table order, with scores:
    #   p0 near A (1.0 away)   0.9
    #   p1 far from all        0.95
    #   p2 near B              0.5
    #   p3 near A (0.5 away)   0.8   nearer to A than p0, but p0 ranks first and claims A
    #   p4 near C              0.1
    # Ranked: p1 FP, p0 TP (precision 1/2), p3 FP, p2 TP (2/4), p4 TP (3/5).
    # AP = (1/2 + 2/4 + 3/5) / 3 = 1.6 / 3 = 8/15.
    truth = points_truth({("t", "c"): [A, B, C]})
    rows = [("t", "c", _near(A, dz=1.0), 0.9), ("t", "c", FAR, 0.95), ("t", "c", _near(B, dy=1.0), 0.5),
            ("t", "c", _near(A, dx=0.5), 0.8), ("t", "c", _near(C, dx=-2.0), 0.1)]
    report = evaluate_picks(truth, scored_picks(rows))
    assert report.overall == Counts(3, 2, 0)  # the one-to-one counts are unchanged
    ranking = report.ranking
    assert ranking.ranked_by == "score"
    for scores in (ranking.per_tomogram_class[("t", "c")], ranking.per_class["c"], ranking.per_tomogram["t"],
                   ranking.overall):
        assert scores.ap == pytest.approx(8 / 15, abs=1e-9)
        # top 3 = p1, p0, p3: only A is found; top 6 and 9 keep all five picks
        assert scores.recall_at(1) == pytest.approx(1 / 3) and scores.recall_at(2) == scores.recall_at(3) == 1.0
    assert average_precision([False, True, False, True, True], 3) == pytest.approx(8 / 15, abs=1e-9)
    # Without p4, C is never found: AP = (1/2 + 2/4) / 3 = 1/3.
    assert evaluate_picks(truth, scored_picks(rows[:4])).ranking.overall.ap == pytest.approx(1 / 3, abs=1e-9)


def test_precision_recall_curve_hand_worked_and_thinned():
    curve = precision_recall_curve([True, False, True, True], 5)
    assert curve == {"rank": [1, 2, 3, 4], "precision": [1.0, 0.5, pytest.approx(2 / 3, abs=1e-6), 0.75],
                     "recall": [0.2, 0.2, 0.4, 0.6], "n_truth": 5}
    assert precision_recall_curve([], 3) == {"rank": [], "precision": [], "recall": [], "n_truth": 3}
    assert precision_recall_curve([True], 0)["recall"] == [0.0]
    long = precision_recall_curve(np.arange(1000) % 3 == 0, 400, max_points=50)
    assert len(long["rank"]) == 50 and long["rank"][0] == 1 and long["rank"][-1] == 1000
    assert long["recall"][-1] == pytest.approx(334 / 400)


def test_average_precision_edge_cases():
    assert average_precision([True, True], 2) == 1.0
    assert average_precision([], 4) == 0.0
    assert math.isnan(average_precision([False], 0))
    with pytest.raises(ValueError, match="true positives"):
        average_precision([True, True], 1)


def test_nan_scores_rank_last():
    # p0 (NaN) finds A, p1 (0.2) is a false positive, p2 (0.5) finds B, p3 (NaN) repeats A.
    # Ranked: p2 TP (1/1), p1 FP, p0 TP (2/3), p3 FP (ties between NaNs keep table order, so p0
    # claims A first). AP = (1 + 2/3) / 2 = 5/6; were NaN ranked first it would be 1.0.
    truth = points_truth({("t", "c"): [A, B]})
    rows = [("t", "c", _near(A, dz=1.0), math.nan), ("t", "c", FAR, 0.2), ("t", "c", _near(B), 0.5),
            ("t", "c", _near(A), math.nan)]
    ranking = evaluate_picks(truth, scored_picks(rows)).ranking
    assert ranking.overall.ap == pytest.approx(5 / 6, abs=1e-9)
    assert ranking.overall.recall_at(1) == 0.5  # top 2 = p2, p1
    assert ranking.overall.recall_at(2) == 1.0


def test_recall_at_kx_cuts_low_scored_true_picks():
    truth = make_truth(4)
    t = truth.to_pylist()
    at = [(r["z"], r["y"], r["x"]) for r in t]
    # Two confident true picks, two confident false ones, two true picks with low scores.
    rows = [("TS_01", "ribosome", at[2], 0.2), ("TS_01", "ribosome", _near(at[0], dz=25.0), 0.7),
            ("TS_01", "ribosome", at[0], 0.9), ("TS_01", "ribosome", _near(at[1], dy=25.0), 0.6),
            ("TS_01", "ribosome", at[3], 0.1), ("TS_01", "ribosome", at[1], 0.8)]
    report = evaluate_picks(truth, scored_picks(rows))
    assert report.overall == Counts(4, 2, 0)
    scores = report.ranking.overall
    assert scores.n_truth == 4 and scores.found == {1: 2, 2: 4, 3: 4}
    assert scores.recall_at(1) == 0.5  # top 4: two true, two false
    assert scores.recall_at(2) == 1.0 and scores.recall_at(3) == 1.0
    # Ranked TP, TP, FP, FP, TP, TP: AP = (1 + 1 + 3/5 + 4/6) / 4 = 49/60.
    assert scores.ap == pytest.approx(49 / 60, abs=1e-9)


def test_class_ap_merges_tomograms_and_map_skips_classes_without_truth():
    truth = points_truth({("TS_1", "a"): [A], ("TS_2", "a"): [A], ("TS_1", "b"): [B]})
    rows = [("TS_1", "a", FAR, 0.9),          # FP
            ("TS_2", "a", A, 0.9),            # TP, tied with the FP above, which comes first in the table
            ("TS_1", "a", A, 0.7),            # TP
            ("TS_1", "b", B, 0.1),            # TP
            ("TS_2", "v", A, 0.99)]           # class "v" has no truth
    report = evaluate_picks(truth, scored_picks(rows))
    r = report.ranking
    # Class a over both tomograms: FP, TP (1/2), TP (2/3) -> (1/2 + 2/3) / 2 = 7/12.
    assert r.per_class["a"].ap == pytest.approx(7 / 12, abs=1e-9)
    assert r.per_class["b"].ap == 1.0 and math.isnan(r.per_class["v"].ap)
    assert r.per_tomogram_class[("TS_1", "a")].ap == 0.5 and r.per_tomogram_class[("TS_2", "a")].ap == 1.0
    # Tomograms and overall: mean over classes with truth.
    assert r.per_tomogram["TS_1"].ap == pytest.approx(0.75) and r.per_tomogram["TS_2"].ap == 1.0
    assert r.overall.ap == pytest.approx((7 / 12 + 1) / 2, abs=1e-9)
    # recall@1x: (TS_1, a) keeps its FP only; (TS_2, a) and (TS_1, b) find theirs; "v" keeps nothing.
    assert r.overall.found == {1: 2, 2: 3, 3: 3} and r.overall.recall_at(1) == pytest.approx(2 / 3)
    assert r.per_class["v"].recall_at(1) == 1.0 and r.per_class["v"].n_truth == 0
    data = report.to_json()
    assert data["per_class"]["v"]["ap"] is None and data["per_class"]["a"]["recall_at_1x"] == 0.5
    assert data["per_tomogram"]["TS_1"]["ap"] == pytest.approx(0.75)
    line = next(line for line in report.format_table().splitlines() if line.startswith("class") and " v " in line)
    assert line.split()[9] == "-"


def test_picks_without_scores_rank_in_table_order_with_one_warning(caplog):
    truth = points_truth({("t", "c"): [A, B], ("u", "c"): [C]})
    rows = [{"tomogram": "t", "class": "c", "instance_id": 1, "z": FAR[0], "y": FAR[1], "x": FAR[2]},
            {"tomogram": "t", "class": "c", "instance_id": 2, "z": A[0], "y": A[1], "x": A[2]},
            {"tomogram": "u", "class": "c", "instance_id": 3, "z": C[0], "y": C[1], "x": C[2]}]
    no_score = pa.Table.from_pylist(rows)
    assert "score" not in no_score.column_names
    with caplog.at_level(logging.WARNING, logger="cryosam_ray.evaluate"):
        report = evaluate_picks(truth, no_score)
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "table order" in warnings[0].getMessage()
    assert report.ranking.ranked_by == "table order" and report.to_json()["ranked_by"] == "table order"
    # Class c in table order: FP, TP (1/2), TP (2/3); 3 truth -> (1/2 + 2/3) / 3 = 7/18.
    assert report.ranking.per_class["c"].ap == pytest.approx(7 / 18, abs=1e-9)
    assert report.overall == Counts(2, 1, 1)


def test_cli_prints_and_writes_ranking_metrics(tmp_path, capsys):
    truth_path = tmp_path / "truth.csv"
    truth = points_truth({("t", "c"): [A, B, C]})
    truth_path.write_text("tomogram,class,instance_id,z,y,x,radius\n" + "".join(
        f"{r['tomogram']},{r['class']},{r['instance_id']},{r['z']},{r['y']},{r['x']},{r['radius']}\n"
        for r in truth.to_pylist()))
    rows = [("t", "c", _near(A, dz=1.0), 0.9), ("t", "c", FAR, 0.95), ("t", "c", _near(B, dy=1.0), 0.5),
            ("t", "c", _near(A, dx=0.5), 0.8), ("t", "c", _near(C, dx=-2.0), 0.1)]
    write_picks(scored_picks(rows), str(tmp_path / "run"))
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--truth", str(truth_path), "--picks", str(tmp_path / "run" / "picks.parquet"),
                 "--json", str(report_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-4:] == ["ap", "r@1x", "r@2x", "r@3x"]
    overall = next(line for line in lines if line.startswith("overall")).split()
    assert overall[-4:] == ["0.5333", "0.3333", "1.0000", "1.0000"]
    data = json.loads(report_path.read_text())
    assert data["ranked_by"] == "score"
    for scope in (data["overall"], data["per_class"]["c"], data["per_tomogram"]["t"]):
        assert scope["ap"] == pytest.approx(8 / 15, abs=1e-9)
        assert (scope["recall_at_1x"], scope["recall_at_2x"], scope["recall_at_3x"]) == pytest.approx((1 / 3, 1, 1))
        assert (scope["tp"], scope["fp"], scope["fn"]) == (3, 2, 0)


# ------------------------------------------------------------------ evaluate_masks

def _blobs():
    labels = np.zeros((12, 16, 20), dtype=np.int32)
    labels[1:4, 2:6, 3:7] = 1
    labels[6:10, 8:12, 10:16] = 2
    labels[2:5, 10:14, 1:4] = 3
    return labels


def test_masks_identical_and_relabelled():
    truth = _blobs()
    report = evaluate_masks(truth, truth)
    assert (report.dice, report.iou, report.instance_dice, report.instance_iou) == (1.0, 1.0, 1.0, 1.0)
    assert (report.matched, report.n_truth, report.n_pred) == (3, 3, 3)
    relabelled = np.select([truth == 1, truth == 2, truth == 3], [70000, 5, 2**40], 0).astype(np.int64)
    again = evaluate_masks(relabelled, truth)
    assert again.instance_dice == 1.0 and again.instance_iou == 1.0 and again.matched == 3


def test_masks_disjoint():
    truth = _blobs()
    pred = np.zeros_like(truth)
    pred[10:12, 0:2, 0:2] = 4
    report = evaluate_masks(pred, truth)
    assert report.dice == 0.0 and report.iou == 0.0
    assert report.instance_dice == 0.0 and report.instance_iou == 0.0 and report.matched == 0
    assert report.n_pred == 1


def test_masks_half_overlap():
    truth = np.zeros((4, 4, 4), dtype=np.uint16)
    pred = np.zeros((4, 4, 4), dtype=np.uint16)
    truth[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred[0:2, 0:2, 1:3] = 9   # 8 voxels, 4 shared
    report = evaluate_masks(pred, truth)
    assert report.dice == 0.5 and report.iou == pytest.approx(1 / 3)
    assert report.instance_dice == 0.5 and report.instance_iou == pytest.approx(1 / 3)
    assert report.matched == 0


def test_masks_best_overlap_instance_and_shape_error():
    truth = np.zeros((2, 2, 10), dtype=np.int32)
    truth[..., :8] = 1  # 32 voxels
    pred = np.zeros_like(truth)
    pred[..., :6] = 1   # overlaps 24
    pred[..., 6:10] = 2  # overlaps 8
    report = evaluate_masks(pred, truth)
    assert report.instance_dice == pytest.approx(2 * 24 / (32 + 24))
    assert report.instance_iou == pytest.approx(24 / 32) and report.matched == 1
    with pytest.raises(ValueError, match=r"\(2, 2, 10\).*\(2, 2, 9\)"):
        evaluate_masks(pred, truth[..., :9])
