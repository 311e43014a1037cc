"""Tables: readers, writers, round trips and malformed input (every error names the file)."""

from __future__ import annotations

import json
import math

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cryosam_ray.errors import TableError
from cryosam_ray.star import write_star
from cryosam_ray.tables import (
    PICK_COLUMNS,
    PICKS_SCHEMA,
    Point,
    angstrom_to_voxels,
    centered_angstrom_to_zyx,
    empty_picks_table,
    picks_table,
    read_picks,
    read_prompts,
    read_truth,
    star_xyz_to_zyx,
    tomogram_stem,
    voxels_to_angstrom,
    write_copick,
    write_picks,
    zyx_to_star_xyz,
)


@pytest.fixture
def picks() -> pa.Table:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        rows.append({"tomogram": ["TS_01", "001"][i % 2], "class": ["ribosome", "apo-ferritin"][i // 6],
                     "instance_id": i + 1, "z": float(rng.uniform(0, 50)), "y": float(rng.uniform(0, 80)),
                     "x": float(rng.uniform(0, 80)) / 3, "voxel_size_a": 10.012, "voxel_count": 100 + i,
                     "score": float(rng.uniform()), "similarity": math.nan if i % 3 == 0 else 0.5,
                     "pred_iou": 0.9})
    return picks_table(rows)


def assert_same(a: pa.Table, b: pa.Table) -> None:
    """Tables equal column by column, NaN equal to NaN (pyarrow's equals treats NaN != NaN)."""
    assert a.schema == b.schema
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type):
            assert np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True), name
        else:
            assert x.to_pylist() == y.to_pylist(), name


def _zyx(points):
    return np.array([[p.z, p.y, p.x] for p in points])


def _table_zyx(table):
    return np.column_stack([table.column(a).to_numpy() for a in "zyx"])


# ------------------------------------------------------------------ units

def test_unit_helpers_round_trip():
    v = np.array([0.0, 1.5, 123.25])
    assert np.allclose(voxels_to_angstrom(v, 10.0), [0.0, 15.0, 1232.5])
    assert np.allclose(angstrom_to_voxels(voxels_to_angstrom(v, 7.3), 7.3), v)
    assert zyx_to_star_xyz(1.0, 2.0, 3.0) == (3.0, 2.0, 1.0)
    assert star_xyz_to_zyx(*zyx_to_star_xyz(1.0, 2.0, 3.0)) == (1.0, 2.0, 3.0)
    z, y, x = centered_angstrom_to_zyx(0.0, 10.0, -20.0, (100, 60, 80), 10.0)
    assert (z, y, x) == (48.0, 31.0, 40.0)
    with pytest.raises(ValueError, match="voxel_size_a"):
        angstrom_to_voxels(1.0, 0.0)


def test_tomogram_stem():
    assert tomogram_stem("data/TS_01.mrc") == "TS_01"
    assert tomogram_stem("s3://b/TS_02.ome.zarr") == "TS_02"
    assert tomogram_stem("tomograms/TS_001/TS_001.st:mrc") == "TS_001"
    assert tomogram_stem("TS_03") == "TS_03"


# ------------------------------------------------------------------ picks tables

def test_picks_table_types_and_defaults():
    table = picks_table([{"tomogram": "TS_01", "cls": "ribo", "z": 1, "y": 2, "x": 3},
                         {"tomogram": "TS_01", "class": "ribo", "z": 4.5, "y": 5, "x": 6, "score": 0.7}])
    assert table.schema == PICKS_SCHEMA
    assert table.column_names == list(PICK_COLUMNS)
    assert table.column("instance_id").to_pylist() == [1, 2]
    assert math.isnan(table.column("similarity")[0].as_py())
    assert table.column("score").to_pylist()[1] == 0.7
    assert empty_picks_table().schema == PICKS_SCHEMA and empty_picks_table().num_rows == 0


def test_picks_table_rejects_unknown_keys():
    with pytest.raises(TableError, match="unknown keys"):
        picks_table([{"tomogram": "a", "class": "b", "z": 1, "y": 2, "x": 3, "colour": "red"}])
    with pytest.raises(TableError, match="missing keys"):
        picks_table([{"tomogram": "a", "class": "b", "z": 1, "y": 2}])


def test_write_picks_parquet_and_csv_identical(tmp_path, picks):
    paths = write_picks(picks, str(tmp_path / "out"))
    assert paths == [str(tmp_path / "out" / "picks.parquet"), str(tmp_path / "out" / "picks.csv")]
    from_parquet, from_csv = read_picks(paths[0]), read_picks(paths[1])
    assert_same(from_parquet, picks)
    assert_same(from_csv, from_parquet)  # NaN, "001" names and float digits all survive CSV
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert pq.read_table(paths[0]).column_names == list(PICK_COLUMNS)


def test_write_picks_prefix_and_fsspec_url(tmp_path, picks):
    paths = write_picks(picks, str(tmp_path / "run1.parquet"))
    assert paths == [str(tmp_path / "run1.parquet"), str(tmp_path / "run1.csv")]
    remote = write_picks(picks, "memory://bucket/results")
    assert remote == ["memory://bucket/results/picks.parquet", "memory://bucket/results/picks.csv"]
    assert_same(read_picks(remote[1]), picks)
    fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_write_empty_picks(tmp_path):
    paths = write_picks(empty_picks_table(), str(tmp_path))
    assert read_picks(paths[0]).num_rows == 0
    assert read_picks(paths[1]).num_rows == 0


def test_read_picks_csv_empty_scores_become_nan(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("tomogram,class,instance_id,z,y,x,voxel_size_a,voxel_count,score,similarity,pred_iou\n"
                    "TS_01,ribo,1,1,2,3,10,5,,,\n")
    table = read_picks(str(path))
    assert math.isnan(table.column("score")[0].as_py())
    assert table.column("z").to_pylist() == [1.0]


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("", "empty"),
    ("tomogram,class,z,y,x\nTS_01,a,1,2,3\n", "missing columns"),
    ("tomogram,class,instance_id,z,y,x,voxel_size_a,voxel_count,score,similarity,pred_iou\n"
     "TS_01,a,1,1,2,3,10,5,0.5,0.5,0.5\nTS_01,a,2,1,oops,3,10,5,0.5,0.5,0.5\n", "row 2"),
])
def test_read_picks_malformed(tmp_path, content, message):
    path = tmp_path / "picks.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TableError, match=message) as info:
        read_picks(str(path))
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ truth

def test_read_truth(tmp_path):
    path = tmp_path / "truth.csv"
    path.write_text("tomogram,class,instance_id,z,y,x,radius,voxel_size_a\n001,ribo,1,1,2,3,6,10\n"
                    "TS_02,ferritin,2,4,5,6.5,3,10\n")
    truth = read_truth(str(path))
    assert truth.column("tomogram").to_pylist() == ["001", "TS_02"]
    assert truth.column("radius").to_pylist() == [6.0, 3.0]
    assert truth.column("voxel_size_a").to_pylist() == [10.0, 10.0]
    assert truth.schema.field("instance_id").type == pa.int64()


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("   \n", "empty"),
    ("tomogram,class,instance_id,z,y,x\nTS,a,1,1,2,3\n", "missing columns.*radius"),
    ("tomogram,class,instance_id,z,y,x,radius\nTS,a,1,1,2,x3,5\n", "column 'x'.*row 1"),
    ("tomogram,class,instance_id,z,y,x,radius\nTS,a,1,1,2,3,0\n", "radius"),
])
def test_read_truth_malformed(tmp_path, content, message):
    path = tmp_path / "truth.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TableError, match=message) as info:
        read_truth(str(path))
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ prompts: CSV

def test_read_prompts_csv_with_class(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("tomogram,z,y,x,class\nTS_01.mrc,1,2.5,3\n007,4,5,6,ribo\n".replace("3\n", "3,ferritin\n", 1))
    points = read_prompts(str(path))
    assert points == [Point("TS_01", 1.0, 2.5, 3.0, "ferritin"), Point("007", 4.0, 5.0, 6.0, "ribo")]


def test_read_prompts_csv_without_class(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("tomogram,z,y,x\nTS_01.zarr,1,2,3\nTS_01,-4,5,6\n")
    points = read_prompts(str(path), default_class="ribo")
    assert points == [Point("TS_01", 1.0, 2.0, 3.0, "ribo"), Point("TS_01", -4.0, 5.0, 6.0, "ribo")]


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "file not found"),
    ("empty.csv", "", "empty"),
    ("header.csv", "tomogram,z,y,x\n", "no prompt points"),
    ("cols.csv", "tomogram,z,y\nTS,1,2\n", r"missing columns \['x'\]"),
    ("nan.csv", "tomogram,z,y,x\nTS,1,2,3\nTS,1,two,3\n", "column 'y'.*row 2.*'two'"),
    ("blank.csv", "tomogram,z,y,x\nTS,1,,3\n", "column 'y'.*row 1"),
    ("p.txt", "tomogram,z,y,x\n", "unknown prompt format"),
])
def test_read_prompts_csv_malformed(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(TableError, match=message) as info:
        read_prompts(str(path))
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ prompts: STAR

RELION3 = """
# version 30001

data_

loop_
_rlnMicrographName #1
_rlnCoordinateX #2
_rlnCoordinateY #3
_rlnCoordinateZ #4
_rlnClassNumber #5
Tomograms/TS_01.mrc  100.000000   50.500000   20.000000 1
data_2/TS_02.mrc   10.000000    5.000000    2.250000 2
"""

RELION4 = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
1 opticsGroup1 10.0

# version 30001

data_particles

loop_
_rlnTomoName #1
_rlnTomoParticleId #2
_rlnCoordinateX #3
_rlnCoordinateY #4
_rlnCoordinateZ #5
_rlnOriginXAngst #6
_rlnOriginYAngst #7
_rlnOriginZAngst #8
TS_001\t1\t4.000000  8.000000   12.000000\t-1.2  -2.4  -3.2
"TS_002"\t2\t6.0  4.0    2.0\t0 0 0
"""

RELION5 = """
data_general

_rlnTomoSubTomosAre2DStacks                       1

data_particles

loop_
_rlnTomoName #1
_rlnCenteredCoordinateXAngst #2
_rlnCenteredCoordinateYAngst #3
_rlnCenteredCoordinateZAngst #4
TS_01 100.0 -50.0 20.0
"""


def test_read_prompts_star_relion3(tmp_path):
    path = tmp_path / "coords.star"
    path.write_text(RELION3)
    points = read_prompts(str(path))
    assert points == [Point("TS_01", 20.0, 50.5, 100.0, "1"), Point("TS_02", 2.25, 5.0, 10.0, "2")]


def test_read_prompts_star_relion4_multiblock(tmp_path):
    path = tmp_path / "particles.star"
    path.write_text(RELION4)
    points = read_prompts(str(path), default_class="ribo")
    assert points == [Point("TS_001", 12.0, 8.0, 4.0, "ribo"), Point("TS_002", 2.0, 4.0, 6.0, "ribo")]


def test_read_prompts_star_relion5_centred(tmp_path):
    path = tmp_path / "r5.star"
    path.write_text(RELION5)
    with pytest.raises(TableError, match="shape") as info:
        read_prompts(str(path), voxel_size_a=10.0)
    assert str(path) in str(info.value)
    points = read_prompts(str(path), voxel_size_a={"TS_01": 10.0}, shapes={"TS_01": (40, 100, 200)})
    assert points == [Point("TS_01", 22.0, 45.0, 110.0, "default")]


@pytest.mark.parametrize("content, message", [
    ("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n_rlnTomoName #4\n", "no rows"),
    ("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnTomoName #3\n1 2 TS\n", "rlnCoordinateX"),
    ("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n1 2 3\n", "rlnTomoName"),
    ("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n_rlnTomoName #4\n"
     "1 2 3 TS\n1 x 3 TS\n", "rlnCoordinateY.*row 2"),
    ("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n_rlnTomoName #4\n1 2 TS\n",
     "expected 4 values"),
])
def test_read_prompts_star_malformed(tmp_path, content, message):
    path = tmp_path / "bad.star"
    path.write_text(content)
    with pytest.raises(TableError, match=message) as info:
        read_prompts(str(path))
    assert str(path) in str(info.value)


def test_star_round_trip_exact(tmp_path, picks):
    path = write_star(picks, str(tmp_path / "picks.star"), version=4)
    points = read_prompts(path)
    assert np.array_equal(_zyx(points), _table_zyx(picks))  # exact, not approximate
    assert [p.tomogram for p in points] == picks.column("tomogram").to_pylist()
    assert [p.cls for p in points] == picks.column("class").to_pylist()


def test_write_star_class_filter(tmp_path, picks):
    path = write_star(picks, str(tmp_path / "ribo.star"), cls="ribosome", version=4)
    text = open(path).read()
    assert "data_particles" in text and "_rlnCoordinateX" in text and "_rlnAutopickFigureOfMerit" in text
    points = read_prompts(path)
    assert len(points) == 6 and {p.cls for p in points} == {"ribosome"}


# ------------------------------------------------------------------ prompts: copick

def _copick_doc(**extra):
    doc = {"pickable_object_name": "ribosome", "user_id": "alice", "session_id": "1", "run_name": "TS_5",
           "points": [{"location": {"x": 100.0, "y": 200.0, "z": 50.0}, "instance_id": 0, "score": 1.0},
                      {"location": {"x": 15.0, "y": 25.0, "z": 35.0}}]}
    doc.update(extra)
    return doc


def test_read_prompts_copick(tmp_path):
    path = tmp_path / "alice_1_ribosome.json"
    path.write_text(json.dumps(_copick_doc()))
    points = read_prompts(str(path), voxel_size_a=10.0)
    assert points == [Point("TS_5", 5.0, 20.0, 10.0, "ribosome"), Point("TS_5", 3.5, 2.5, 1.5, "ribosome")]
    per_tomo = read_prompts(str(path), voxel_size_a={"TS_5": 5.0})
    assert per_tomo[0] == Point("TS_5", 10.0, 40.0, 20.0, "ribosome")


def test_read_prompts_copick_voxel_spacing_from_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_copick_doc(voxel_spacing=5.0)))
    assert read_prompts(str(path))[0] == Point("TS_5", 10.0, 40.0, 20.0, "ribosome")


@pytest.mark.parametrize("doc, message", [
    (_copick_doc(), "no voxel size"),
    ("{not json", "not valid JSON"),
    ({"points": "nope"}, "points"),
    (_copick_doc(points=[]), "no prompt points"),
    (_copick_doc(points=[{"location": {"x": 1, "y": "b"}}], voxel_spacing=10), "point 0"),
])
def test_read_prompts_copick_malformed(tmp_path, doc, message):
    path = tmp_path / "p.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(TableError, match=message) as info:
        read_prompts(str(path))
    assert str(path) in str(info.value)


def test_copick_round_trip_and_layout(tmp_path, picks):
    paths = write_copick(picks, str(tmp_path / "copick"), user_id="bob", session_id="7")
    expected = {tmp_path / "copick" / "ExperimentRuns" / t / "Picks" / f"bob_7_{c}.json"
                for t in ("TS_01", "001") for c in ("ribosome", "apo-ferritin")}
    assert {p for p in map(type(tmp_path), paths)} == expected
    doc = json.loads((tmp_path / "copick/ExperimentRuns/TS_01/Picks/bob_7_ribosome.json").read_text())
    assert doc["run_name"] == "TS_01" and doc["pickable_object_name"] == "ribosome"
    assert doc["user_id"] == "bob" and doc["session_id"] == "7"
    assert doc["points"][0]["transformation_"] == np.eye(4).tolist()
    first = picks.filter(pa.compute.equal(picks.column("tomogram"), "TS_01"))
    assert doc["points"][0]["location"]["x"] == pytest.approx(first.column("x")[0].as_py() * 10.012)
    assert doc["points"][0]["instance_id"] == first.column("instance_id")[0].as_py()

    points = [p for path in sorted(paths) for p in read_prompts(path, voxel_size_a=10.012)]
    got = {(p.tomogram, p.cls): [] for p in points}
    for p in points:
        got[(p.tomogram, p.cls)].append((p.z, p.y, p.x))
    rows = picks.to_pylist()
    for (tomo, cls), coords in got.items():
        want = [(r["z"], r["y"], r["x"]) for r in rows if r["tomogram"] == tomo and r["class"] == cls]
        assert np.allclose(coords, want, rtol=0, atol=1e-6)
    assert len(points) == picks.num_rows


def test_write_copick_needs_voxel_size(tmp_path):
    table = picks_table([{"tomogram": "TS", "class": "a", "z": 1, "y": 2, "x": 3}])
    with pytest.raises(TableError, match="voxel_size_a"):
        write_copick(table, str(tmp_path))
