"""copick projects in and out: a project built with copick's own API (on disk, and on S3 through
the local endpoint), prompts as copick picks, ``cryosam run --copick ...``, and the picks and
segmentations read back through copick agree with picks.parquet (Angstrom = voxels x spacing)."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

copick = pytest.importorskip("copick")

from cryosam_ray.cli import main  # noqa: E402
from cryosam_ray.config import CopickSection  # noqa: E402
from cryosam_ray.copick_io import PromptSource, _import_copick, prior_radii  # noqa: E402
from cryosam_ray.tables import read_picks  # noqa: E402
from cryosam_ray.tomo_io import read_mrc  # noqa: E402

from ribosome_data import ribosome_dataset  # noqa: E402

SPACING = 10.0
OBJECTS = [{"name": "ribosome", "is_particle": True, "label": 1, "radius": 120.0, "color": [255, 0, 0, 255]}]


def _project(config_path, root_url: str, data, prompts_csv, fs_args=None) -> None:
    """A copick project at ``root_url``: each tomogram of ``data`` as run <name>, voxel spacing 10 A,
    type wbp; the prompts as picks of user alice, session 0."""
    _import_copick()
    config_path.write_text(json.dumps({"name": "test", "description": "", "version": "1.31.0",
                                       "config_type": "filesystem", "pickable_objects": OBJECTS,
                                       "overlay_root": root_url,
                                       "overlay_fs_args": {"auto_mkdir": True} if fs_args is None else fs_args}))
    project = copick.from_file(str(config_path))
    for path in sorted(p for p in data.glob("*.mrc") if "_labels" not in p.name):
        with mrcfile.open(path) as mrc:
            volume = np.asarray(mrc.data, np.float32)
        project.new_run(path.stem).new_voxel_spacing(SPACING).new_tomogram("wbp").from_numpy(volume)
    from copick.models import CopickLocation, CopickPoint

    for line in prompts_csv.read_text().splitlines()[1:]:
        name, z, y, x, cls = line.split(",")
        picks = project.get_run(name).new_picks(cls, session_id="0", user_id="alice", exist_ok=True)
        location = CopickLocation(x=float(x) * SPACING, y=float(y) * SPACING, z=float(z) * SPACING)
        picks.points = list(picks.points or []) + [CopickPoint(location=location)]
        picks.store()


@pytest.fixture(scope="module")
def local_project(tmp_path_factory):
    root, data = ribosome_dataset(tmp_path_factory.mktemp("copick"), (48, 96, 96))
    config = root / "copick.json"
    _project(config, f"local://{root}/project", data, root / "prompts.csv")
    return root, config


def _run(config, out, *extra) -> int:
    return main(["run", "--copick", str(config), "--voxel-spacing", "10", "--tomo-type", "wbp",
                 "--prompts", "copick:alice", "--out", str(out), "--address", "none", "--no-progress",
                 "--copick-session", "7", *extra])


def _written(config) -> dict[str, list[tuple]]:
    """run -> sorted (instance_id, z, y, x voxels, score) of user cryosam's ribosome picks, session 7."""
    project = copick.from_file(str(config))
    out = {}
    for run in project.runs:
        for picks in run.get_picks(object_name="ribosome", user_id="cryosam", session_id="7"):
            out[run.name] = sorted((p.instance_id, p.location.z / SPACING, p.location.y / SPACING,
                                    p.location.x / SPACING, p.score) for p in picks.points)
    return out


def _table(out) -> dict[str, list[tuple]]:
    table = read_picks(str(out / "picks.parquet")).to_pylist()
    rows = {}
    for r in table:
        rows.setdefault(r["tomogram"], []).append((r["instance_id"], r["z"], r["y"], r["x"], r["score"]))
    return {k: sorted(v) for k, v in rows.items()}


def test_picks_and_masks_go_back_into_the_project(local_project):
    root, config = local_project
    out = root / "out"
    assert _run(config, out) == 0
    table, written = _table(out), _written(config)
    assert set(table) == {"synth_000", "synth_001"} and set(written) == set(table)
    for name in table:
        assert len(written[name]) == len(table[name]) > 0
        for a, b in zip(written[name], table[name]):
            assert a[0] == b[0] and np.allclose(a[1:], b[1:], atol=1e-4)
    project = copick.from_file(str(config))
    for name in table:
        (segmentation,) = project.get_run(name).get_segmentations(user_id="cryosam", session_id="7", name="ribosome")
        semantic, _ = read_mrc(str(out / "masks" / f"{name}_semantic.mrc"))
        assert segmentation.voxel_size == SPACING
        assert np.array_equal(segmentation.numpy() > 0, semantic == 1)  # ribosome is class 1
    prompts = (out / "copick_prompts.csv").read_text().splitlines()
    assert prompts[0] == "tomogram,z,y,x,class" and all(line.endswith(",ribosome") for line in prompts[1:])


def test_a_rerun_resumes_and_runs_select_what_is_read(local_project, tmp_path):
    root, config = local_project
    out = root / "out"
    if not (out / "run.json").exists():
        assert _run(config, out) == 0
    before = _table(out)
    assert _run(config, out) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["tomogram_sets"]["new"] == [] and {r["status"] for r in manifest["tomograms"].values()} == {"skipped"}
    assert _table(out) == before
    prompt_run = (root / "prompts.csv").read_text().splitlines()[1].split(",")[0]
    only = tmp_path / "only"
    assert _run(config, only, "--runs", prompt_run) == 0
    assert set(_table(only)) == {prompt_run}


@pytest.mark.parametrize("case, expected", [
    ("missing config", "no such file"),
    ("not JSON", "not a usable copick project config"),
    ("unknown run", "no run ['TS_99']"),
    ("unknown user", "no picks of that user"),
    ("no such tomogram type", "no 'denoised' tomogram at voxel spacing 10 A"),
    ("data portal config", "only filesystem projects"),
])
def test_copick_inputs_that_cannot_be_used_are_one_line(local_project, tmp_path, capsys, case, expected):
    root, config = local_project
    args = {"missing config": ([], tmp_path / "none.json"), "not JSON": ([], tmp_path / "bad.json"),
            "unknown run": (["--runs", "TS_99"], config), "unknown user": ([], config),
            "no such tomogram type": (["--tomo-type", "denoised"], config),
            "data portal config": ([], tmp_path / "portal.json")}[case]
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "portal.json").write_text(json.dumps({"config_type": "cryoet_data_portal", "dataset_ids": [10301]}))
    extra, path = args
    argv = ["run", "--copick", str(path), "--voxel-spacing", "10", "--tomo-type", "wbp", "--out",
            str(tmp_path / "out"), "--address", "none", "--no-progress",
            "--prompts", "copick:nobody" if case == "unknown user" else "copick:alice", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err, err


def test_prompt_source_syntax():
    assert PromptSource.parse("copick:alice") == PromptSource("alice", None)
    assert PromptSource.parse("copick:alice/manual-1") == PromptSource("alice", "manual-1")


def test_a_project_on_s3(tmp_path, s3_bucket):
    root, data = ribosome_dataset(tmp_path, (48, 96, 96))
    config = root / "copick.json"
    _project(config, f"{s3_bucket}/project", data, root / "prompts.csv", fs_args={})
    prompt_run = (root / "prompts.csv").read_text().splitlines()[1].split(",")[0]
    out = root / "out"
    assert _run(config, out, "--runs", prompt_run) == 0
    table, written = _table(out), _written(config)
    assert set(written) == set(table) == {prompt_run}
    assert [w[0] for w in written[prompt_run]] == [t[0] for t in table[prompt_run]]
    assert np.allclose([w[1:] for w in written[prompt_run]], [t[1:] for t in table[prompt_run]], atol=1e-4)


def test_the_objects_radii_are_the_size_prior_in_voxels(local_project):
    _, config = local_project
    assert prior_radii(CopickSection(config=str(config), voxel_spacing=SPACING)) == {"ribosome": 12.0}
    assert prior_radii(CopickSection()) == {}
