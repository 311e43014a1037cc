"""Previews: z slabs (mean projections) with every pick, truth and mask outlines, written as PNG."""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import pytest
from PIL import Image

from cryosam_ray.errors import TableError
from cryosam_ray.previews import (CLASS_COLOURS, UNASSIGNED_COLOUR, class_colours, plan_slabs, render_preview,
                                  write_preview)
from cryosam_ray.tomo_io import open_tomogram, write_mrc

SHAPE = (40, 40, 48)
BALL_RADIUS = 5
# far apart in z: with slabs ~2 radii thick each ball lies in a different slab, off the central slices
CENTRES = {"ribosome": (4, 20, 12), "hsp60": (33, 30, 34)}


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
    picks = [{"tomogram": "TS_07", "class": cls, "instance_id": i, "z": c[0], "y": c[1], "x": c[2],
              "radius": BALL_RADIUS} for i, (cls, c) in enumerate(CENTRES.items(), start=1)]
    return open_tomogram(tmp_path / "TS_07.mrc"), picks, labels


def _count(image: Image.Image, colour, box=None) -> int:
    pixels = np.asarray(image.crop(box) if box else image)
    return int(np.all(pixels == np.asarray(colour, np.uint8), axis=-1).sum())


def _panel_of(image, z: float) -> dict:
    return next(p for p in image.info["panels"] if p["z0"] <= z < p["z1"])


def _pixel(panel: dict, y: float, x: float) -> tuple[int, int]:
    """(x, y) image pixel of voxel (y, x) of a panel."""
    left, top = panel["box"][:2]
    sy, sx = panel["scale"]
    return round(left + (x + 0.5) * sx - 0.5), round(top + (y + 0.5) * sy - 0.5)


def test_plan_slabs_cover_the_depth():
    assert plan_slabs(40, 5) == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert plan_slabs(64, 6.5) == [(0, 13), (13, 26), (26, 38), (38, 51), (51, 64)]
    thick = plan_slabs(500, 4, max_slabs=12)  # 62 slabs of 8 would be too many: 12 thicker ones
    assert len(thick) == 12 and thick[0][0] == 0 and thick[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(thick, thick[1:]))
    assert plan_slabs(3, 20) == [(0, 3)]
    with pytest.raises(ValueError):
        plan_slabs(0, 5)


def test_every_pick_is_drawn_in_its_slab(scene):
    tomo, picks, _ = scene
    image = render_preview(tomo, picks, max_side=512)
    assert image.mode == "RGB"
    panels = image.info["panels"]
    assert [(p["z0"], p["z1"]) for p in panels] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert sum(p["picks"] for p in panels) == len(picks)
    colours = class_colours(["ribosome", "hsp60"])
    assert colours == {"hsp60": CLASS_COLOURS[0], "ribosome": CLASS_COLOURS[1]}
    for cls, centre in CENTRES.items():
        mine = _panel_of(image, centre[0])
        assert mine["picks"] == 1
        assert _count(image, colours[cls], mine["box"]) > 0
        other = [p for p in panels if p is not mine]
        assert all(_count(image, colours[cls], p["box"]) == 0 for p in other)


def test_nothing_to_draw_draws_no_palette_colour(scene):
    tomo, _, _ = scene
    image = render_preview(tomo, [])
    assert all(_count(image, colour) == 0 for colour in CLASS_COLOURS)
    assert image.info["panels"][0]["z0"] == 0 and image.info["panels"][-1]["z1"] == SHAPE[0]


def test_circle_around_the_pick_at_its_radius(scene):
    tomo, picks, _ = scene
    radius = 8.0
    pick = dict(picks[0], voxel_count=4 / 3 * math.pi * radius ** 3)
    image = render_preview(tomo, [pick], max_side=512, pick_radius=5)
    colour = class_colours(["ribosome"])["ribosome"]
    pixels = np.asarray(image)
    panel = _panel_of(image, pick["z"])
    cx, cy = _pixel(panel, pick["y"], pick["x"])
    assert tuple(pixels[cy, cx]) != colour
    sx = panel["scale"][1]
    ring = [tuple(pixels[cy, cx + d]) == colour for d in range(round(radius * sx) - 3, round(radius * sx) + 2)]
    assert any(ring)
    inside = [tuple(pixels[cy, cx + d]) == colour for d in range(0, round(radius * sx) - 4)]
    assert not any(inside)


def test_truth_is_a_cross_and_counted(scene):
    tomo, picks, _ = scene
    truth = [{"tomogram": "TS_07", "class": "hsp60", "z": 25, "y": 10, "x": 10, "radius": 5.0}]
    image = render_preview(tomo, picks, truth=truth)
    panel = _panel_of(image, 25)
    assert panel["truth"] == 1 and panel["picks"] == 0
    colour = class_colours(["ribosome", "hsp60"])["hsp60"]
    pixels = np.asarray(image)
    cx, cy = _pixel(panel, 10, 10)
    assert tuple(pixels[cy, cx]) == colour  # a cross passes through its centre, a circle does not
    assert tuple(pixels[cy, cx + 4]) == colour and tuple(pixels[cy + 4, cx]) == colour


def test_mask_outlines_take_the_class_colour(scene):
    tomo, _, labels = scene
    image = render_preview(tomo, [], labels, label_classes={1: "ribosome", 2: "hsp60"}, pick_radius=5)
    colours = class_colours(["ribosome", "hsp60"])
    for cls, centre in CENTRES.items():
        panel = _panel_of(image, centre[0])
        assert _count(image, colours[cls], panel["box"]) > 0
        # an outline, not a filled disc: the ball's centre keeps its gray value
        cx, cy = _pixel(panel, *centre[1:])
        assert tuple(np.asarray(image)[cy, cx]) != colours[cls]


def test_labels_may_be_a_lazily_opened_mask(scene, tmp_path):
    tomo, picks, labels = scene
    write_mrc(tmp_path / "TS_07_instances.mrc", labels, 10.0)
    lazy = open_tomogram(tmp_path / "TS_07_instances.mrc")
    a = render_preview(tomo, picks, lazy, label_classes={1: "ribosome", 2: "hsp60"})
    b = render_preview(tomo, picks, labels, label_classes={1: "ribosome", 2: "hsp60"})
    assert np.array_equal(np.asarray(a), np.asarray(b))


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
    assert _count(image, colours["ribosome"]) > 0 and _count(image, colours["hsp60"]) > 0
    assert sum(p["picks"] for p in image.info["panels"]) == 2


def test_reads_slab_by_slab_never_the_whole_volume(scene):
    tomo, picks, labels = scene
    calls = []
    original = tomo.slab
    tomo.slab = lambda axis, a, b: calls.append((axis, a, b)) or original(axis, a, b)
    tomo.read = None  # would fail if called
    render_preview(tomo, picks, labels)
    assert all(axis == 0 and b - a <= 10 for axis, a, b in calls)
    assert sorted((a, b) for _, a, b in calls) == [(0, 10), (10, 20), (20, 30), (30, 40)]


class _FakeTomogram:
    """A huge tomogram that only makes the slabs asked for, and counts the slices read."""

    def __init__(self, shape):
        self.shape, self.name, self.read_slices = shape, "huge", 0

    def slab(self, axis, start, stop):
        assert axis == 0
        self.read_slices += stop - start
        return np.random.default_rng(start).normal(size=(stop - start, *self.shape[1:])).astype(np.float32)


@pytest.mark.parametrize("shape", [(16, 40, 48), (500, 1024, 1024)])
def test_small_and_large_volumes_fit(shape):
    picks = [{"class": "ribosome", "z": z, "y": shape[1] / 2, "x": shape[2] / 2, "voxel_count": 500}
             for z in np.linspace(0, shape[0] - 1, 7)]
    tomo = _FakeTomogram(shape)
    image = render_preview(tomo, picks, max_side=512, max_slices=8)
    panels = image.info["panels"]
    assert len(panels) <= 12 and sum(p["picks"] for p in panels) == len(picks)
    longest = max(max(p["box"][2] - p["box"][0], p["box"][3] - p["box"][1]) for p in panels)
    assert 128 <= longest <= 256
    assert image.width <= 4 * 256 + 3 * 12 + 20
    assert tomo.read_slices <= 8 * len(panels)  # thick slabs are sampled
    assert _count(image, class_colours(["ribosome"])["ribosome"]) > 0


def test_bad_input_is_named(scene):
    tomo, picks, labels = scene
    with pytest.raises(TableError, match="'z'"):
        render_preview(tomo, [{"class": "ribosome", "y": 1, "x": 2}])
    with pytest.raises(TableError, match="truth"):
        render_preview(tomo, picks, truth=[{"class": "ribosome", "z": 1, "x": 2}])
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
