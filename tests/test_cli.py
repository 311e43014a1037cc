"""The command line end to end: synth, then evaluate the truth against itself and altered copies."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cryosam_ray.cli import main
from cryosam_ray.tables import picks_table, read_truth, write_picks

SHAPE = ["64", "128", "128"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--n", "2", "--seed", "3", "--shape", *SHAPE, "--snr", "0.5",
                 "--builtin-shapes"]) == 0
    return out


def _picks_from_truth(truth, *, shift=0.0, keep_every=1):
    rows = []
    for i, row in enumerate(truth.to_pylist()):
        if i % keep_every:
            continue
        rows.append({"tomogram": row["tomogram"], "class": row["class"], "instance_id": row["instance_id"],
                     "z": row["z"] + shift, "y": row["y"], "x": row["x"], "voxel_size_a": 10.0,
                     "voxel_count": 1, "score": 1.0})
    return picks_table(rows)


def _evaluate(dataset, tmp_path, picks, *extra):
    out = tmp_path / "picks"
    write_picks(picks, str(out))
    report = tmp_path / "report.json"
    assert main(["evaluate", "--truth", str(dataset / "truth.csv"), "--picks", str(out / "picks.parquet"),
                 "--json", str(report), *extra]) == 0
    return json.loads(report.read_text())


def test_synth_writes_the_documented_files(dataset):
    names = sorted(p.name for p in dataset.iterdir())
    assert names == ["prompts.csv", "synth_000.mrc", "synth_000_labels.mrc", "synth_001.mrc", "synth_001_labels.mrc",
                     "truth.csv"]
    with open(dataset / "truth.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"tomogram", "class", "instance_id", "z", "y", "x", "radius"} <= set(rows[0])
    assert {r["tomogram"] for r in rows} == {"synth_000", "synth_001"}
    assert len({r["class"] for r in rows}) == 3
    with open(dataset / "prompts.csv") as handle:
        prompts = list(csv.DictReader(handle))
    assert sorted(p["class"] for p in prompts) == ["atpase", "hsp60", "ribosome"]
    assert all(any(p.items() <= r.items() for r in rows) for p in prompts)  # each one a truth particle


def test_truth_against_itself_is_perfect(dataset, tmp_path, capsys):
    result = _evaluate(dataset, tmp_path, _picks_from_truth(read_truth(str(dataset / "truth.csv"))))
    assert result["overall"]["f1"] == 1.0 and result["overall"]["fbeta"] == 1.0
    assert set(result["per_class"]) == {"ribosome", "atpase", "hsp60"}
    assert set(result["overall"]) >= {"tp", "fp", "fn", "precision", "recall", "f1", "fbeta"}
    assert "overall" in capsys.readouterr().out


def test_shifted_copy_beyond_half_radius_matches_nothing(dataset, tmp_path):
    truth = read_truth(str(dataset / "truth.csv"))
    far = float(np.max(truth.column("radius").to_numpy())) * 0.5 + 0.5
    result = _evaluate(dataset, tmp_path, _picks_from_truth(truth, shift=far))
    assert result["overall"]["tp"] == 0 and result["overall"]["f1"] == 0.0
    near = _evaluate(dataset, tmp_path, _picks_from_truth(truth, shift=1.0))
    assert near["overall"]["f1"] == 1.0
    fixed = _evaluate(dataset, tmp_path, _picks_from_truth(truth, shift=far), "--distance-vox", str(far + 1))
    assert fixed["overall"]["f1"] == 1.0


def test_thinned_copy_halves_recall(dataset, tmp_path):
    truth = read_truth(str(dataset / "truth.csv"))
    n = truth.num_rows
    result = _evaluate(dataset, tmp_path, _picks_from_truth(truth, keep_every=2))
    kept = (n + 1) // 2
    assert result["overall"]["tp"] == kept and result["overall"]["fn"] == n - kept
    assert result["overall"]["precision"] == 1.0
    assert result["overall"]["recall"] == pytest.approx(kept / n)
    assert result["overall"]["f1"] == pytest.approx(2 * kept / (kept + n))


def test_mask_scores_of_labels_against_themselves(dataset, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for labels in dataset.glob("*_labels.mrc"):
        (masks / labels.name.replace("_labels", "_instances")).write_bytes(labels.read_bytes())
    result = _evaluate(dataset, tmp_path, _picks_from_truth(read_truth(str(dataset / "truth.csv"))),
                       "--truth-labels", str(dataset), "--pred-masks", str(masks))
    assert set(result["masks"]) == {"synth_000", "synth_001"}
    assert all(m["dice"] == 1.0 and m["instance_dice"] == 1.0 for m in result["masks"].values())


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    code = main(["evaluate", "--truth", str(tmp_path / "none.csv"), "--picks", str(tmp_path / "none.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("cryosam evaluate: error:") and "none.csv" in err
    assert main(["synth", "--out", str(tmp_path), "--set", "synth.snr=-1"]) == 2
    assert "synth.snr" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "synth" in out and "evaluate" in out
