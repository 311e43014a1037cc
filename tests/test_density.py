"""The density stage: blobs at the prompts' scale, shell profiles, density scores, and a
two-class crowded scene with a membrane picked end to end by the default pipeline."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage

from cryosam_ray.config import load_config
from cryosam_ray.density import DensityMap, bin_factor, density_scores, robust_z
from cryosam_ray.evaluate import evaluate_picks
from cryosam_ray.executors.in_process import run_in_process
from cryosam_ray.synth import SynthSettings, write_dataset
from cryosam_ray.tables import read_picks, read_truth


class _Volume:
    """What DensityMap reads of a Tomogram: its shape, z slabs and normalisation."""

    def __init__(self, data: np.ndarray):
        self.data = data.astype(np.float32)
        self.shape = self.data.shape

    def slab(self, axis: int, start: int, stop: int) -> np.ndarray:
        assert axis == 0
        return self.data[start:stop]

    def normalize(self, block: np.ndarray) -> np.ndarray:
        return (block - self.data.mean()) / self.data.std()


def _ball(shape, centre, radius, hollow: float = 0.0) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    d = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    return ((d <= radius) & (d >= hollow * radius)).astype(np.float32)


def _scene(seed: int = 0):
    """Dark solid balls and dark hollow shells of the same radius (5) on noise, 6 of each."""
    rng = np.random.default_rng(seed)
    shape = (48, 96, 96)
    centres = [(z, y, x) for z in (14, 34) for y in (16, 48, 80) for x in (16, 48, 80)][:12]
    volume = np.zeros(shape, np.float32)
    for i, c in enumerate(centres):
        volume -= _ball(shape, c, 5.0, hollow=0.0 if i % 2 == 0 else 0.6)
    volume = ndimage.gaussian_filter(volume, 0.7) + rng.normal(0, 0.25, shape).astype(np.float32)
    solid = np.array(centres[0::2], float)
    hollow = np.array(centres[1::2], float)
    return _Volume(volume), solid, hollow


def test_blobs_are_found_at_the_prompts_scale_and_polarity():
    volume, solid, hollow = _scene()
    dmap = DensityMap(volume, 1)
    peaks, strength = dmap.peaks(5.0, polarity=-1.0, top_k=12)
    truth = np.concatenate([solid, hollow])
    distance = np.linalg.norm(peaks[:, None] - truth[None], axis=2).min(axis=1)
    assert (distance <= 1.5).all() and len(peaks) == 12
    assert (strength > 0).all()
    # the other polarity finds no particle centre among its strongest blobs
    bright, _ = dmap.peaks(5.0, polarity=1.0, top_k=12)
    assert np.linalg.norm(bright[:, None] - truth[None], axis=2).min() > 3


@pytest.mark.parametrize("bin", [1, 2])
def test_refine_finds_a_blob_centre_between_voxels(bin):
    """Dark balls (radius 5 and 3, the second elongated along z as by the missing wedge) centred
    between voxels: from points 2 voxels off, the refined positions lie within 0.25 voxel of the
    true centres (the nearest voxel is 0.5-0.7 away); a point beyond ``within`` of the centre
    stays within ``within`` of where it started."""
    shape = (40, 64, 64)
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    centres = np.array([(14.4, 20.3, 30.6), (26.6, 44.5, 40.4)])
    volume = np.zeros(shape, np.float32)
    for (cz, cy, cx), r, stretch in zip(centres, (5.0, 3.0), (1.0, 1.5)):
        inside = ((zz - cz) / stretch) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        volume -= ndimage.gaussian_filter(inside.astype(np.float32), 1.0)
    dmap = DensityMap(_Volume(volume), bin)
    for centre, r in zip(centres, (5.0, 3.0)):
        start = centre + np.array([1.5, -1.0, 0.9])
        refined = dmap.refine(start[None], r, -1.0, within=0.5 * r * bin + 1)[0]
        assert np.linalg.norm(refined - centre) <= 0.25 * bin
        far = centre + np.array([0.0, 4.0 * bin, 0.0])
        held = dmap.refine(far[None], r, -1.0, within=1.5 * bin)[0]
        assert np.linalg.norm(held - far) <= 1.5 * bin + 0.5 * bin * np.sqrt(3)


def test_shell_profiles_are_rotation_invariant():
    """An elongated particle and the same particle turned 90 degrees give the same profile."""
    shape = (40, 40, 40)
    rod = np.zeros(shape, np.float32)
    rod[17:23, 17:23, 8:32] = 1.0
    turned = np.transpose(rod, (2, 1, 0))
    centre = np.array([[19.5, 19.5, 19.5]])
    a = DensityMap(_Volume(rod), 1).shells(centre, 6.0, 1.0)
    b = DensityMap(_Volume(turned), 1).shells(centre, 6.0, 1.0)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_density_score_tells_solid_from_hollow_particles_of_one_size():
    volume, solid, hollow = _scene()
    dmap = DensityMap(volume, 1)
    background = np.random.default_rng(1).uniform([6, 6, 6], [42, 90, 90], size=(60, 3))
    points = np.concatenate([solid, hollow, background])
    shells = dmap.shells(points, 5.0, -1.0)
    contrast = dmap.contrast(points, 5.0, -1.0)
    score, shape = density_scores(shells, contrast, shells[0])  # the query: one solid ball
    ranked = np.argsort(-score)
    assert set(ranked[:len(solid)]) == set(range(len(solid)))  # solids first (AP 1)
    # and the shape part alone says which kind each particle is
    hollow_query = density_scores(shells, contrast, shells[len(solid)])[1]
    assert (shape[:len(solid)] > hollow_query[:len(solid)]).all()
    assert (hollow_query[len(solid):len(solid) + len(hollow)] > shape[len(solid):len(solid) + len(hollow)]).all()


def test_robust_z_and_bin_factor():
    np.testing.assert_allclose(robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0])),
                               (np.array([1.0, 2.0, 3.0, 4.0, 100.0]) - 3.0) / 1.4826)
    assert [bin_factor(r) for r in (3.0, 5.9, 6.0, 11.9, 12.0, 27.0)] == [1, 1, 1, 1, 2, 4]


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """Two similar-size classes (ribosome- and HSP60-like built-in shapes), touching neighbours
    and a membrane, one prompt per class, picked with the defaults."""
    root = tmp_path_factory.mktemp("crowded")
    settings = SynthSettings(shape=(64, 128, 128), classes=("ribosome", "hsp60"), particles_per_class=6,
                             membranes=1, gold_beads=1, snr=0.5, use_real_maps=False, crowding=0.3)
    paths = write_dataset(str(root / "data"), n=1, seed=5, settings=settings)
    summary = run_in_process(paths, str(root / "data" / "prompts.csv"), str(root / "run"), load_config("demo"))
    assert not summary.failed
    report = evaluate_picks(read_truth(str(root / "data" / "truth.csv")),
                            read_picks(str(root / "run" / "picks.parquet")))
    return report


def test_two_similar_classes_in_a_crowded_scene_are_told_apart(crowded):
    for cls in ("ribosome", "hsp60"):
        counts, ranked = crowded.per_class[cls], crowded.ranking.per_class[cls]
        assert counts.f1 >= 0.7, (cls, counts)
        assert ranked.ap >= 0.6, (cls, ranked)
