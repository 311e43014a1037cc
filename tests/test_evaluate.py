"""Evaluation: one-to-one matching, precision / recall / F-beta, and mask scores."""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pytest

from cryosam_ray.evaluate import Counts, evaluate_masks, evaluate_picks, match_points
from cryosam_ray.tables import picks_table

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
    assert set(data) == {"per_class", "per_tomogram", "overall"}
    metric_keys = {"tp", "fp", "fn", "precision", "recall", "f1", "fbeta"}
    assert set(data["overall"]) == metric_keys
    assert set(data["per_class"]) == {"ribosome"} and set(data["per_class"]["ribosome"]) == metric_keys
    assert set(data["per_tomogram"]) == {"TS_01", "TS_02"}
    assert data["overall"]["recall"] == 0.5 and data["overall"]["tp"] == 10
    text = report.format_table()
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["scope", "name", "tp", "fp", "fn"]
    assert any(line.startswith("class") and "ribosome" in line for line in lines)
    assert sum(line.startswith("tomogram") for line in lines) == 2
    assert lines[-1].startswith("overall") and "0.5000" in lines[-1]
    assert len({len(line) for line in lines if not line.startswith("-")}) == 1  # aligned


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
