"""Cross-Plane Self-Prompting with the weight-free segmenter on realistic synthetic tomograms."""

from __future__ import annotations

import numpy as np
import pytest

from cryosam_ray.propagation import propagate
from cryosam_ray.segmenters.base import SlicePrediction, window_iou
from cryosam_ray.segmenters.classical import ClassicalSegmenter
from cryosam_ray.synth import SynthSettings, synthesize
from cryosam_ray.tomo_io import open_tomogram, write_mrc

# The figure this suite holds the classical backend to (issue 3): median Dice of the ribosome
# instances against the truth labels at SNR 0.5, 60 degree tilt range, raw polarity.
# Reached when written: 0.86 (six directions), 0.88 (z only); the same with inverted polarity.
MIN_RIBOSOME_DICE = 0.8


def _dataset(tmp_path, *, shape=(64, 128, 128), seed=1, snr=0.5, polarity="raw"):
    settings = SynthSettings(shape=shape, snr=snr, polarity=polarity, particles_per_class=4, use_real_maps=False)
    synth = synthesize(settings, seed=seed)
    path = tmp_path / "tomo.mrc"
    write_mrc(path, synth.volume, settings.voxel_size_a)
    return synth, open_tomogram(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("prop"))


def _dice(synth, row, inst) -> float:
    truth = synth.labels == row["instance_id"]
    pred = np.zeros_like(truth)
    if not inst.empty:
        inst.paste(pred, True)
    return 2 * float((truth & pred).sum()) / float(truth.sum() + pred.sum())


def _rows(synth, cls):
    return [r for r in synth.truth if r["class"] == cls]


def _points(rows):
    return np.array([[r["z"], r["y"], r["x"]] for r in rows])


@pytest.mark.parametrize("directions", ["six", "z"])
def test_ribosome_dice_reaches_the_target(dataset, directions):
    synth, tomo = dataset
    rows = _rows(synth, "ribosome")
    assert rows, "the synthetic tomogram holds ribosomes"
    instances = propagate(ClassicalSegmenter(), tomo, _points(rows), directions=directions)
    dices = [_dice(synth, r, inst) for r, inst in zip(rows, instances)]
    assert np.median(dices) >= MIN_RIBOSOME_DICE, dices


def test_inverted_polarity_works_as_well(tmp_path):
    synth, tomo = _dataset(tmp_path, polarity="inverted")
    rows = _rows(synth, "ribosome")
    instances = propagate(ClassicalSegmenter(), tomo, _points(rows))
    assert np.median([_dice(synth, r, i) for r, i in zip(rows, instances)]) >= MIN_RIBOSOME_DICE


def test_six_directions_reach_what_z_only_misses(dataset):
    """The z walk alone stops where the missing wedge blurs the particle's caps; y and x walks add voxels."""
    synth, tomo = dataset
    pts = _points(_rows(synth, "ribosome"))
    six = propagate(ClassicalSegmenter(), tomo, pts, directions="six")
    zonly = propagate(ClassicalSegmenter(), tomo, pts, directions="z")
    for a, b in zip(six, zonly):
        assert a.n_slices > b.n_slices
        assert a.voxel_count >= b.voxel_count
        full = np.zeros(tomo.shape, bool)
        a.paste(full, True)
        part = np.zeros(tomo.shape, bool)
        b.paste(part, True)
        assert part[full].sum() >= 0.9 * part.sum()  # the z-only mask lies (almost) inside the six-way one


def test_batched_fronts_equal_one_prompt_at_a_time(dataset):
    synth, tomo = dataset
    pts = _points(synth.truth[:6])
    together = propagate(ClassicalSegmenter(), tomo, pts)
    for p, inst in zip(pts, together):
        alone = propagate(ClassicalSegmenter(), tomo, p[None])[0]
        assert alone.bbox == inst.bbox
        np.testing.assert_array_equal(alone.mask, inst.mask)


class _CountingSegmenter(ClassicalSegmenter):
    def __init__(self):
        super().__init__()
        self.batches = []

    def predict(self, requests):
        self.batches.append(len(requests))
        return super().predict(requests)


def test_one_segmenter_call_per_step_for_all_fronts(dataset):
    synth, tomo = dataset
    seg = _CountingSegmenter()
    instances = propagate(seg, tomo, _points(synth.truth[:5]))
    longest_walk = max(inst.bbox[3 + a] - inst.bbox[a] for inst in instances for a in range(3))
    assert seg.batches[0] == 15  # 5 prompts x 3 seed planes, in one call
    assert len(seg.batches) <= longest_walk + 2
    assert max(seg.batches[1:]) > 6  # many fronts share each step's call


def _clearance(synth, voxel) -> float:
    """Distance in voxels from ``voxel`` to the nearest particle, bead or membrane surface."""
    distances = [np.linalg.norm(_points(synth.truth) - voxel, axis=1).min() - synth.truth[0]["radius"]]
    distances += [np.linalg.norm(np.array([b["z"], b["y"], b["x"]]) - voxel) - b["radius"] for b in synth.beads]
    distances += [abs(np.linalg.norm(np.array([m["z"], m["y"], m["x"]]) - voxel) - m["radius"]) for m in synth.membranes]
    return float(min(distances))


def test_prompt_outside_and_on_background_give_empty_instances_with_messages(dataset):
    synth, tomo = dataset
    grid = np.stack(np.meshgrid(*[np.arange(8, s - 8, 6) for s in tomo.shape], indexing="ij"), -1).reshape(-1, 3)
    empty = max(grid, key=lambda v: _clearance(synth, v))
    assert _clearance(synth, empty) > 8
    pts = np.array([[-5.0, 10, 10], [10, 10, 500.0], empty, _points(synth.truth)[0]])
    instances = propagate(ClassicalSegmenter(), tomo, pts)
    assert "outside the volume" in instances[0].message and instances[0].empty
    assert "outside the volume" in instances[1].message
    assert "no particle found" in instances[2].message and instances[2].empty
    assert not instances[3].empty and instances[3].message == ""


def test_prompt_at_the_volume_edge(tmp_path):
    """A particle cut by the volume's edge: fronts stop at the edge, the mask stays inside the volume."""
    volume = np.random.default_rng(0).normal(0, 0.3, (40, 60, 80)).astype(np.float32)
    zz, yy, xx = np.ogrid[:40, :60, :80]
    ball = (zz - 2) ** 2 + (yy - 30) ** 2 + (xx - 77) ** 2 <= 8 ** 2
    volume[ball] -= 2.0
    write_mrc(tmp_path / "edge.mrc", volume, 10.0)
    tomo = open_tomogram(tmp_path / "edge.mrc")
    inst = propagate(ClassicalSegmenter(), tomo, np.array([[0.0, 30, 79]]))[0]
    assert not inst.empty
    z0, y0, x0, z1, y1, x1 = inst.bbox
    assert z0 == 0 and x1 == 80 and z1 <= 40
    pred = np.zeros(ball.shape, bool)
    inst.paste(pred, True)
    assert 2 * (pred & ball).sum() / (pred.sum() + ball.sum()) > 0.8


def test_non_square_slices_keep_geometry(tmp_path):
    """An ellipsoid in a strongly non-square volume: each axis' slices map back to the right voxels."""
    shape = (24, 50, 120)
    volume = np.random.default_rng(1).normal(0, 0.3, shape).astype(np.float32)
    zz, yy, xx = np.ogrid[:24, :50, :120]
    body = ((zz - 12) / 6) ** 2 + ((yy - 20) / 9) ** 2 + ((xx - 90) / 14) ** 2 <= 1
    volume[body] += 2.0
    write_mrc(tmp_path / "ns.mrc", volume, 10.0)
    tomo = open_tomogram(tmp_path / "ns.mrc")
    inst = propagate(ClassicalSegmenter(), tomo, np.array([[12.0, 20, 90]]))[0]
    pred = np.zeros(shape, bool)
    inst.paste(pred, True)
    assert 2 * (pred & body).sum() / (pred.sum() + body.sum()) > 0.85
    np.testing.assert_allclose(inst.centroid, (12, 20, 90), atol=1.0)


def test_window_iou_and_best_point():
    a = np.ones((4, 4), bool)
    assert window_iou(a, (0, 0), a, (2, 2)) == pytest.approx(4 / 28)
    assert window_iou(a, (0, 0), a, (10, 10)) == 0.0
    conf = np.zeros((4, 4), np.float32)
    conf[3, 1] = 0.9
    conf[0, 0] = 1.0
    mask = np.zeros((4, 4), bool)
    mask[2:, :] = True
    assert SlicePrediction(mask, (5, 7), conf, 1.0).best_point() == (8, 8)
