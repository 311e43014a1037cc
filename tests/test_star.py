"""RELION 4 and 5 STAR: hand-worked coordinates, round trips, binning, and the segment command."""

from __future__ import annotations

import numpy as np
import pytest

from cryosam_ray.cli import main
from cryosam_ray.errors import TableError
from cryosam_ray.star import write_star
from cryosam_ray.tables import Point, picks_table, read_prompts
from cryosam_ray.tomo_io import write_mrc

SHAPES = {"TS_01": (60, 100, 140)}  # (D, H, W): not square


def _picks():
    return picks_table([{"tomogram": "TS_01", "class": "ribosome", "z": 10.0, "y": 25.5, "x": 100.0,
                         "voxel_size_a": 8.0, "score": 0.9},
                        {"tomogram": "TS_01", "class": "fas", "z": 30.0, "y": 50.0, "x": 70.0,
                         "voxel_size_a": 8.0, "score": 0.5}])


def _rows(text: str, block: str = "data_particles") -> list[list[str]]:
    body = text.split(block, 1)[1]
    return [line.split() for line in body.splitlines() if line and not line.startswith(("_", "loop_", "#"))]


def test_relion5_centred_angstrom_by_hand(tmp_path):
    path = write_star(_picks(), str(tmp_path / "picks.star"), version=5, shapes=SHAPES)
    text = open(path).read()
    assert "_rlnCenteredCoordinateXAngst" in text and "_rlnTomoTiltSeriesPixelSize" in text
    assert text.index("data_particles") < text.index("data_optics")  # RELION's import reads the first block
    first = _rows(text)[0]
    # x = 100 of W = 140 -> (100 - 70) * 8 = 240 A; y = 25.5 of H = 100 -> (25.5 - 50) * 8 = -196; z: (10 - 30) * 8
    assert first[0] == "TS_01" and [float(v) for v in first[1:4]] == [240.0, -196.0, -160.0]
    assert _rows(text, "data_optics")[0] == ["1", "opticsGroup1", "8.0"]
    points = read_prompts(path, voxel_size_a={"TS_01": 8.0}, shapes=SHAPES)
    assert points == [Point("TS_01", 10.0, 25.5, 100.0, "ribosome"), Point("TS_01", 30.0, 50.0, 70.0, "fas")]


def test_relion4_voxels_and_a_binning(tmp_path):
    path = write_star(_picks(), str(tmp_path / "picks.star"), version=4)
    assert [float(v) for v in _rows(open(path).read())[0][1:4]] == [100.0, 25.5, 10.0]  # X, Y, Z = x, y, z
    assert read_prompts(path, voxel_size_a=8.0)[0] == Point("TS_01", 10.0, 25.5, 100.0, "ribosome")
    # the same file read for a tomogram binned 2x (16 A voxels): coordinates halve
    assert read_prompts(path, voxel_size_a=16.0)[0] == Point("TS_01", 5.0, 12.75, 50.0, "ribosome")


def test_relion4_file_in_unbinned_pixels(tmp_path):
    path = tmp_path / "particles.star"
    path.write_text("data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnTomoTiltSeriesPixelSize #2\n1 2.0\n\n"
                    "data_particles\nloop_\n_rlnTomoName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
                    "_rlnCoordinateZ #4\n_rlnOpticsGroup #5\nTS_01 400 200 80 1\n")
    # 2 A pixels read for a tomogram of 8 A voxels (bin 4): x = 400 / 4
    assert read_prompts(str(path), voxel_size_a=8.0) == [Point("TS_01", 20.0, 50.0, 100.0, "default")]


def test_relion5_needs_the_tomogram_and_names_it(tmp_path):
    path = write_star(_picks(), str(tmp_path / "picks.star"), version=5, shapes=SHAPES)
    with pytest.raises(TableError, match="TS_01") as info:
        read_prompts(path, voxel_size_a=8.0)
    assert path in str(info.value)
    with pytest.raises(TableError, match="shape of every tomogram"):
        write_star(_picks(), str(tmp_path / "x.star"), version=5, shapes={})


def test_segment_reads_relion5_prompts_with_the_tomogram_given(tmp_path):
    volume = np.random.default_rng(0).normal(size=SHAPES["TS_01"]).astype(np.float32)
    zz, yy, xx = np.indices(volume.shape)
    volume -= 4.0 * (((zz - 30) ** 2 + (yy - 50) ** 2 + (xx - 70) ** 2) < 36)
    write_mrc(tmp_path / "TS_01.mrc", volume, 8.0)
    prompts = write_star(_picks(), str(tmp_path / "prompts.star"), version=5, shapes=SHAPES, cls="fas")
    code = main(["segment", "--tomogram", str(tmp_path / "TS_01.mrc"), "--prompts", prompts,
                 "--out", str(tmp_path / "out")])
    assert code == 0
    from cryosam_ray.tables import read_picks

    picks = read_picks(str(tmp_path / "out" / "picks.parquet"))
    assert picks.num_rows == 1 and abs(picks.column("x")[0].as_py() - 70) < 2
