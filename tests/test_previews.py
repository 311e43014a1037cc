"""Previews: three central slices with picks and mask outlines, drawn and written as PNG."""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import pytest
from PIL import Image

from cryosam_ray.errors import TableError
from cryosam_ray.previews import (CLASS_COLOURS, UNASSIGNED_COLOUR, class_colours, render_preview,
                                  write_preview)
from cryosam_ray.tomo_io import open_tomogram, write_mrc

SHAPE = (24, 40, 48)  # central slices: z = 12, y = 20, x = 24
BALL_RADIUS = 5
# ball A crosses the central z and y slices, ball B the central z and x slices
CENTRES = {"ribosome": (12, 20, 12), "hsp60": (12, 30, 24)}


def _balls() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    zz, yy, xx = np.indices(SHAPE)
    for instance_id, centre in enumerate(CENTRES.values(), start=1):
        inside = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= BALL_RADIUS ** 2
        volume[inside] += 6.0
        labels[inside] = instance_id
    return volume, labels


@pytest.fixture
def scene(tmp_path):
    volume, labels = _balls()
    write_mrc(tmp_path / "TS_07.mrc", volume, 10.0)
    picks = [{"tomogram": "TS_07", "class": cls, "instance_id": i, "z": c[0], "y": c[1], "x": c[2]}
             for i, (cls, c) in enumerate(CENTRES.items(), start=1)]
    return open_tomogram(tmp_path / "TS_07.mrc"), picks, labels


def _count(image: Image.Image, colour, box=None) -> int:
    pixels = np.asarray(image.crop(box) if box else image)
    return int(np.all(pixels == np.asarray(colour, np.uint8), axis=-1).sum())


def _pixel(image, axis: str, row: float, col: float) -> tuple[int, int]:
    """(x, y) image pixel of voxel (row, col) of the ``axis`` panel."""
    panel = image.info["panels"][axis]
    left, top = panel["box"][:2]
    sy, sx = panel["scale"]
    return round(left + (col + 0.5) * sx - 0.5), round(top + (row + 0.5) * sy - 0.5)


def test_render_shape_and_class_colours(scene):
    tomo, picks, labels = scene
    image = render_preview(tomo, picks, labels, max_side=512)
    assert image.mode == "RGB"
    assert image.width > image.height
    assert image.width <= 1.5 * 512 + 50 and image.height <= 512
    colours = class_colours(["ribosome", "hsp60"])
    assert colours == {"hsp60": CLASS_COLOURS[0], "ribosome": CLASS_COLOURS[1]}
    panels = image.info["panels"]
    assert [panels[a]["index"] for a in "zyx"] == [12, 20, 24]
    z, y, x = (panels[a]["box"] for a in "zyx")
    for colour in colours.values():
        assert _count(image, colour, z) > 0
    # each ball crosses only its own one of the y and x slices
    assert _count(image, colours["ribosome"], y) > 0 and _count(image, colours["hsp60"], y) == 0
    assert _count(image, colours["hsp60"], x) > 0 and _count(image, colours["ribosome"], x) == 0


def test_nothing_to_draw_draws_no_palette_colour(scene):
    tomo, _, _ = scene
    image = render_preview(tomo, [])
    assert all(_count(image, colour) == 0 for colour in CLASS_COLOURS)


def test_circle_around_the_pick_at_its_radius(scene):
    tomo, picks, _ = scene
    radius = 8.0
    pick = dict(picks[0], voxel_count=4 / 3 * math.pi * radius ** 3)
    image = render_preview(tomo, [pick], max_side=512)
    colour = class_colours(["ribosome"])["ribosome"]
    pixels = np.asarray(image)
    cx, cy = _pixel(image, "z", pick["y"], pick["x"])
    assert tuple(pixels[cy, cx]) != colour
    sx = image.info["panels"]["z"]["scale"][1]
    ring = [tuple(pixels[cy, cx + d]) == colour for d in range(round(radius * sx) - 3, round(radius * sx) + 2)]
    assert any(ring)
    inside = [tuple(pixels[cy, cx + d]) == colour for d in range(0, round(radius * sx) - 4)]
    assert not any(inside)
    # on the y = 20 slice the sphere's cross-section is the same circle (the pick lies on it)
    cx, cy = _pixel(image, "y", pick["z"], pick["x"])
    assert any(tuple(pixels[cy, cx - d]) == colour for d in range(round(radius * sx) - 3, round(radius * sx) + 2))


def test_mask_outlines_take_the_class_colour(scene):
    tomo, _, labels = scene
    image = render_preview(tomo, [], labels, label_classes={1: "ribosome", 2: "hsp60"})
    colours = class_colours(["ribosome", "hsp60"])
    z_box = image.info["panels"]["z"]["box"]
    assert all(_count(image, colour, z_box) > 0 for colour in colours.values())
    # an outline, not a filled disc: the ball's centre keeps its gray value
    pixels = np.asarray(image)
    cx, cy = _pixel(image, "z", *CENTRES["ribosome"][1:])
    assert tuple(pixels[cy, cx]) != colours["ribosome"]


def test_labels_without_a_class_are_white_and_no_palette_colour(scene):
    tomo, _, labels = scene
    image = render_preview(tomo, [], labels)
    assert all(_count(image, colour) == 0 for colour in CLASS_COLOURS)
    assert _count(image, UNASSIGNED_COLOUR) > 0


def test_classes_fix_the_colours_and_other_tomograms_are_skipped(scene):
    tomo, picks, _ = scene
    other = dict(picks[0], tomogram="TS_99", **{"class": "atpase"})
    image = render_preview(tomo, [*picks, other], classes=["atpase", "hsp60", "ribosome"])
    colours = class_colours(["atpase", "hsp60", "ribosome"])
    z_box = image.info["panels"]["z"]["box"]
    assert _count(image, colours["ribosome"], z_box) > 0 and _count(image, colours["hsp60"], z_box) > 0
    assert _count(image, colours["atpase"], z_box) == 0


def test_reads_exactly_three_slices(scene):
    tomo, picks, labels = scene
    calls = []
    original = tomo.slice
    tomo.slice = lambda axis, index: calls.append((axis, index)) or original(axis, index)
    render_preview(tomo, picks, labels)
    assert sorted(calls) == [(0, 12), (1, 20), (2, 24)]


class _FakeTomogram:
    """A huge tomogram that only makes the slices asked for."""

    def __init__(self, shape):
        self.shape, self.name = shape, "huge"

    def slice(self, axis, index):
        rows, cols = [s for a, s in enumerate(self.shape) if a != axis]
        return np.random.default_rng(axis).normal(size=(rows, cols)).astype(np.float32)

    def normalize(self, block, *, clip_sigma=5.0):
        return np.clip(block, -clip_sigma, clip_sigma)


@pytest.mark.parametrize("shape", [(16, 40, 48), (500, 1024, 1024)])
def test_small_and_large_volumes_fit(shape):
    picks = [{"class": "ribosome", "z": shape[0] / 2, "y": shape[1] / 2, "x": shape[2] / 2, "voxel_count": 500}]
    image = render_preview(_FakeTomogram(shape), picks, max_side=512)
    panels = image.info["panels"]
    longest = max(max(p["box"][2] - p["box"][0], p["box"][3] - p["box"][1]) for p in panels.values())
    assert 128 <= longest <= 256
    assert image.width > image.height and image.width <= 1.5 * 512 + 50 and image.height <= 512
    assert _count(image, class_colours(["ribosome"])["ribosome"], panels["z"]["box"]) > 0


def test_bad_input_is_named(scene):
    tomo, picks, labels = scene
    with pytest.raises(TableError, match="'z'"):
        render_preview(tomo, [{"class": "ribosome", "y": 1, "x": 2}])
    with pytest.raises(ValueError, match="shape"):
        render_preview(tomo, picks, labels[:, :, :-1])


def test_write_preview_local_and_memory(scene, tmp_path):
    tomo, picks, labels = scene
    image = render_preview(tomo, picks, labels)
    path = tmp_path / "out" / "previews" / "TS_07.png"
    assert write_preview(path, image) == str(path)
    with Image.open(path) as read:
        assert read.format == "PNG" and read.size == image.size
        assert np.array_equal(np.asarray(read.convert("RGB")), np.asarray(image))
    assert [p.name for p in path.parent.iterdir()] == ["TS_07.png"]  # no temporary left

    url = "memory://previews-test/TS_07.png"
    try:
        assert write_preview(url, image) == url
        data = fsspec.filesystem("memory").cat_file("/previews-test/TS_07.png")
        with Image.open(io.BytesIO(data)) as read:
            assert read.format == "PNG" and read.size == image.size
    finally:
        fsspec.filesystem("memory").rm("/previews-test", recursive=True)
