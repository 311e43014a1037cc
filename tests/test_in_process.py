"""`cryosam segment` and `cryosam run --address none` (executors/in_process.py, no Ray) end to end on synthetic data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cryosam_ray.cli import main
from cryosam_ray.plan import expand_tomograms
from cryosam_ray.tables import read_picks, read_prompts, read_truth
from cryosam_ray.tomo_io import read_mrc

# F1 of the ribosome class with ONE prompt, over two 64x128x128 tomograms at SNR 0.5 with the
# weight-free backends; reached when written: 1.0 (17 of 17 ribosomes, no false pick).
MIN_RIBOSOME_F1 = 0.7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    assert main(["synth", "--out", str(data), "--n", "2", "--seed", "5", "--shape", "64", "128", "128",
                 "--snr", "0.5", "--builtin-shapes"]) == 0
    with open(data / "truth.csv") as handle:
        first = next(r for r in csv.DictReader(handle) if r["class"] == "ribosome")
    prompts = root / "prompts.csv"
    prompts.write_text(f"tomogram,z,y,x,class\n{first['tomogram']},{first['z']},{first['y']},{first['x']},ribosome\n")
    (data / "broken.mrc").write_bytes(b"not a tomogram" * 100)
    return root, data, prompts


@pytest.fixture(scope="module")
def run_dir(dataset):
    root, data, prompts = dataset
    out = root / "out"
    code = main(["run", "--tomograms", str(data), "--prompts", str(prompts), "--out", str(out), "--address", "none"])
    assert code == 1  # one tomogram failed, and the exit code says so
    return out


def test_run_finds_the_prompted_class(dataset, run_dir, tmp_path):
    _, data, _ = dataset
    report = tmp_path / "report.json"
    assert main(["evaluate", "--truth", str(data / "truth.csv"), "--picks", str(run_dir / "picks.parquet"),
                 "--json", str(report)]) == 0
    ribosome = json.loads(report.read_text())["per_class"]["ribosome"]
    assert ribosome["f1"] >= MIN_RIBOSOME_F1, ribosome


def test_run_writes_every_output(dataset, run_dir):
    _, data, _ = dataset
    picks = read_picks(str(run_dir / "picks.parquet"))
    from_csv = read_picks(str(run_dir / "picks.csv"))
    for name in picks.column_names:  # equal column by column, NaN (prompts have no match similarity) included
        np.testing.assert_array_equal(picks.column(name).to_numpy(zero_copy_only=False),
                                      from_csv.column(name).to_numpy(zero_copy_only=False))
    assert set(picks.column("tomogram").to_pylist()) == {"synth_000", "synth_001"}
    assert set(picks.column("class").to_pylist()) == {"ribosome"}
    shapes = {n: read_mrc(data / f"{n}.mrc")[0].shape for n in ("synth_000", "synth_001")}
    star = read_prompts(str(run_dir / "picks.star"), voxel_size_a=10.0, shapes=shapes)  # RELION 5: centred A
    assert len(star) == picks.num_rows
    np.testing.assert_allclose([p.x for p in star], picks.column("x").to_numpy(), atol=1e-9)
    for name in ("synth_000", "synth_001"):
        labels, voxel = read_mrc(run_dir / "masks" / f"{name}_instances.mrc")
        semantic, _ = read_mrc(run_dir / "masks" / f"{name}_semantic.mrc")
        ids = picks.filter(picks.column("tomogram").to_numpy(zero_copy_only=False) == name)
        assert set(np.unique(labels)) - {0} == set(ids.column("instance_id").to_pylist())
        assert voxel == 10.0 and set(np.unique(semantic)) == {0, 1}
        assert np.array_equal(labels > 0, semantic > 0)
        assert (run_dir / "previews" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_corrupt_tomogram_is_recorded_and_the_others_finish(run_dir):
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["tomograms"]["broken"]["status"] == "failed"
    assert "broken.mrc" in manifest["tomograms"]["broken"]["error"]
    assert manifest["tomograms"]["synth_000"]["status"] == "done"
    assert manifest["tomograms"]["synth_001"]["status"] == "done"
    assert manifest["counts"]["failed"] == 1 and manifest["config"]["matching"]["top_k"] == 512
    assert set(manifest["times_s"]) >= {"encode", "match", "propagate"}


def test_segment_command(dataset, tmp_path, capsys):
    _, data, _ = dataset
    truth = read_truth(str(data / "truth.csv")).to_pylist()
    rows = [r for r in truth if r["tomogram"] == "synth_000"][:3]
    prompts = tmp_path / "p.csv"
    lines = ["tomogram,z,y,x"] + [f"synth_000,{r['z']},{r['y']},{r['x']}" for r in rows] + ["synth_000,5,5,999"]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "seg"
    assert main(["segment", "--tomogram", str(data / "synth_000.mrc"), "--prompts", str(prompts),
                 "--out", str(out)]) == 0
    assert "outside the volume" in capsys.readouterr().err
    picks = read_picks(str(out / "picks.parquet")).to_pylist()
    assert [p["instance_id"] for p in picks] == [1, 2, 3, 4]
    assert picks[3]["voxel_count"] == 0 and all(p["voxel_count"] > 100 for p in picks[:3])
    for pick, row in zip(picks, rows):
        assert np.linalg.norm([pick["z"] - row["z"], pick["y"] - row["y"], pick["x"] - row["x"]]) < row["radius"] / 2
    labels, _ = read_mrc(out / "masks" / "synth_000_instances.mrc")
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def _segment(dataset, tmp_path, row: str) -> int:
    """``cryosam segment`` of synth_000 with one prompt row; returns the exit code."""
    _, data, _ = dataset
    prompts = tmp_path / "p.csv"
    prompts.write_text(f"tomogram,z,y,x\n{row}\n")
    return main(["segment", "--tomogram", str(data / "synth_000.mrc"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "seg")])


def test_segment_reports_prompts_for_another_tomogram(dataset, tmp_path, capsys):
    assert _segment(dataset, tmp_path, "TS_99,1,2,3") == 2
    assert "no prompt names tomogram 'synth_000'" in capsys.readouterr().err


def test_tomogram_specs_expand_folders_and_globs(dataset):
    _, data, _ = dataset
    names = [u.rsplit("/", 1)[-1] for u in expand_tomograms([str(data)])]
    assert names == ["broken.mrc", "synth_000.mrc", "synth_001.mrc"]  # labels volumes are not tomograms
    assert [u.rsplit("/", 1)[-1] for u in expand_tomograms([str(data / "synth_00?.mrc")])] == \
        ["synth_000.mrc", "synth_001.mrc"]
    assert expand_tomograms([str(data / "missing.mrc")]) == [str(data / "missing.mrc")]


def test_no_query_names_the_failed_prompt_tomogram(tmp_path, capsys):
    from cryosam_ray.tomo_io import write_mrc

    volume = np.ones((16, 20, 24), np.float32)
    volume[3, 4, 5] = np.nan
    write_mrc(tmp_path / "TS_nan.mrc", volume, 10.0)
    (tmp_path / "prompts.csv").write_text("tomogram,z,y,x\nTS_nan,8,10,12\n")
    code = main(["run", "--tomograms", str(tmp_path / "TS_nan.mrc"), "--prompts", str(tmp_path / "prompts.csv"),
                 "--out", str(tmp_path / "out"), "--address", "none", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "every tomogram holding prompts failed" in err and "is nan" in err, err


def test_a_class_whose_prompts_give_no_mask_is_reported(dataset, tmp_path):
    _, data, prompts = dataset
    with_lost = tmp_path / "prompts.csv"
    name = prompts.read_text().splitlines()[1].split(",")[0]
    with_lost.write_text(prompts.read_text() + f"{name},0,0,0,ghost\n")  # the corner: too little context
    out = tmp_path / "out"
    main(["run", "--tomograms", str(data / f"{name}.mrc"), "--prompts", str(with_lost), "--out", str(out),
          "--address", "none", "--no-progress"])
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["classes_without_mask"] == ["ghost"] and manifest["classes"] == ["ribosome"]


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_an_interrupted_run_stops_writes_what_is_done_and_resumes(dataset, tmp_path, signum, code):
    import os
    import signal
    import subprocess
    import sys
    import time

    _, data, prompts = dataset
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cryosam_ray.cli", "run", "--tomograms", str(data / "synth_000.mrc"),
               str(data / "synth_001.mrc"), "--prompts", str(prompts), "--out", str(out), "--address", "none",
               "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "features").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signum)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 10 and proc.returncode == code, err
    assert f"stopped by {signal.Signals(signum).name}" in err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["interrupted"] == signal.Signals(signum).name
    assert not (out / ".cryosam.lock").exists()  # the lease is given back
    assert main(["run", "--tomograms", str(data / "synth_000.mrc"), str(data / "synth_001.mrc"), "--prompts",
                 str(prompts), "--out", str(out), "--address", "none", "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["counts"]["done"] + \
        json.loads((out / "run.json").read_text())["counts"]["skipped"] == 2


def test_segment_exits_1_when_no_prompt_gives_a_mask(dataset, tmp_path, capsys):
    assert _segment(dataset, tmp_path, "synth_000,5,5,999") == 1
    assert "segmented 0 of 1" in capsys.readouterr().out


def test_a_failed_write_leaves_none_of_the_tomograms_outputs(dataset, tmp_path, monkeypatch):
    from cryosam_ray import job
    from cryosam_ray.stages import outputs

    _, data, prompts = dataset

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "write_preview", full_disk)  # after both masks were written
    out = tmp_path / "out"
    assert main(["run", "--tomograms", str(data / "synth_000.mrc"), "--prompts", str(prompts), "--out", str(out),
                 "--address", "none", "--no-progress"]) == 1
    assert not any((out / "masks").glob("synth_000*")) if (out / "masks").exists() else True
    record = json.loads((out / "tomograms" / "synth_000.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert outputs.output_urls(str(out), "synth_000", "mrc")[0].endswith("synth_000_instances.mrc")


def _committed_shards(group, axis: int) -> list[str]:
    """Shard indices whose done flag is written in a feature group (chunk files of ``done<axis>``:
    ``c/<i>`` in zarr 3's layout, ``<i>`` in zarr 2's)."""
    return [p.name for p in group.glob(f"done{axis}/**/*")
            if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json"]


def _shard_chunks(group, axis: int, shard: str) -> list:
    """The chunk files of shard ``shard`` of axis ``axis`` (``c/<i>/...`` in zarr 3, ``<i>.0.0.0`` in zarr 2)."""
    files = list(group.glob(f"axis{axis}/c/{shard}/**/*")) + list(group.glob(f"axis{axis}/{shard}.*"))
    return [p for p in files if p.is_file()]


def _kill_when(command, ready, timeout=120.0):
    """Start ``command``, SIGKILL it as soon as ``ready()`` holds (or it ends). Returns its exit code."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


@pytest.mark.parametrize("point", ["encoding", "between tomograms", "writing"])
def test_a_killed_driver_resumes_with_identical_picks_and_no_recomputed_shard(dataset, run_dir, tmp_path, point):
    import sys

    _, data, prompts = dataset
    out = tmp_path / "out"
    inputs = [str(data / "synth_000.mrc"), str(data / "synth_001.mrc")]
    command = [sys.executable, "-m", "cryosam_ray.cli", "run", "--tomograms", *inputs, "--prompts", str(prompts),
               "--out", str(out), "--address", "none", "--no-progress"]
    ready = {
        "encoding": lambda: sum(len(_committed_shards(g, 0)) for g in out.glob("features/*")) >= 2,
        "between tomograms": lambda: (out / "tomograms" / "synth_000.json").exists(),
        "writing": lambda: any(out.glob("masks/synth_001_instances.mrc")),
    }[point]
    assert _kill_when(command, ready) == -9  # killed, not finished
    committed = {chunk: chunk.stat().st_mtime_ns for group in out.glob("features/*") for axis in range(3)
                 for shard in _committed_shards(group, axis) for chunk in _shard_chunks(group, axis, shard)}
    records = {p.name: p.read_text() for p in (out / "tomograms").glob("*.json")}
    assert main(command[3:]) == 0
    assert committed or point != "encoding"
    for path, stamp in committed.items():  # committed feature chunks are read, never written again
        assert path.stat().st_mtime_ns == stamp, path
    for name, text in records.items():  # a tomogram whose record was committed is not redone
        assert (out / "tomograms" / name).read_text() == text
    clean, resumed = read_picks(str(run_dir / "picks.parquet")), read_picks(str(out / "picks.parquet"))
    for column in ("tomogram", "class", "instance_id", "z", "y", "x", "voxel_count"):
        assert clean.column(column).to_pylist() == resumed.column(column).to_pylist(), column
