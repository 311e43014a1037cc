"""Tests of the synthetic tomogram generator (cryosam_ray.synth)."""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import scipy.fft
from scipy import ndimage as ndi

from cryosam_ray import synth, synth_shapes
from cryosam_ray.cli import main
from cryosam_ray.config import load_config
from cryosam_ray.errors import ConfigError
from cryosam_ray.synth import SynthSettings, derive_seed, missing_wedge_mask, synthesize, write_dataset

SMALL = SynthSettings(shape=(64, 128, 128), particles_per_class=4, use_real_maps=False)
# the new classes and crowding: thin, small, built-in shapes only
MIXED = SynthSettings(shape=(48, 96, 96), classes=("ribosome", "ball", "rod"), particles_per_class=4,
                      use_real_maps=False)
DATA_DIR = Path(os.environ.get(synth.DATA_DIR_ENV) or synth_shapes.DEFAULT_DATA_DIR)
NOISE_FREE = 1e9  # snr at which the added noise is far below float32 precision of the signal


@pytest.fixture(scope="module")
def tomo():
    return synthesize(SMALL, seed=7)


def _regions(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    return {i + 1: box for i, box in enumerate(ndi.find_objects(labels)) if box is not None}


def _distance_to_region(labels, instance_id, box, point) -> float:
    voxels = np.argwhere(labels[box] == instance_id) + [s.start for s in box]
    return float(np.sqrt(((voxels - point) ** 2).sum(axis=1)).min())


def _centre(row) -> np.ndarray:
    return np.array([row["z"], row["y"], row["x"]], float)


def test_outputs_have_documented_shapes_and_types(tomo):
    assert tomo.volume.shape == tomo.labels.shape == SMALL.shape
    assert tomo.volume.dtype == np.float32 and tomo.labels.dtype == np.int32
    assert np.isfinite(tomo.volume).all()
    assert {row["class"] for row in tomo.truth} == set(SMALL.classes)
    assert [row["instance_id"] for row in tomo.truth] == list(range(1, len(tomo.truth) + 1))
    assert all(row["tomogram"] == "synth_000" and row["voxel_size_a"] == 10.0 for row in tomo.truth)
    assert abs(float(tomo.volume.mean())) > 1e-3 * float(tomo.volume.std())  # not centred, like real data
    assert len(tomo.beads) == SMALL.gold_beads and len(tomo.membranes) == SMALL.membranes


def test_same_seed_is_bit_identical_and_other_seeds_differ(tomo):
    again = synthesize(SMALL, seed=7)
    assert np.array_equal(again.volume, tomo.volume) and np.array_equal(again.labels, tomo.labels)
    assert again.truth == tomo.truth
    other = synthesize(SMALL, seed=8)
    assert not np.array_equal(other.volume, tomo.volume)
    assert [_centre(r).tolist() for r in other.truth] != [_centre(r).tolist() for r in tomo.truth]


def test_instances_are_single_regions_without_overlap(tomo):
    regions = _regions(tomo.labels)
    assert set(regions) == {row["instance_id"] for row in tomo.truth}
    for instance_id, box in regions.items():
        assert ndi.label(tomo.labels[box] == instance_id)[1] == 1, f"instance {instance_id} is split"
    for a, b in itertools.combinations(tomo.truth, 2):
        assert np.linalg.norm(_centre(a) - _centre(b)) >= a["radius"] + b["radius"]


def test_truth_centres_and_radii_agree_with_labels(tomo):
    regions = _regions(tomo.labels)
    shape = np.array(SMALL.shape)
    for row in tomo.truth:
        centre, box = _centre(row), regions[row["instance_id"]]
        assert _distance_to_region(tomo.labels, row["instance_id"], box, centre) <= 2.0
        voxels = np.argwhere(tomo.labels[box] == row["instance_id"]) + [s.start for s in box]
        assert np.sqrt(((voxels - centre) ** 2).sum(axis=1)).max() <= row["radius"]
        assert np.all(centre >= row["radius"]) and np.all(centre <= shape - 1 - row["radius"])


def test_membranes_and_beads_keep_clear_of_particles(tomo):
    half_width = (synth_shapes.LEAFLET_SEPARATION_A / 2 + 2 * synth_shapes.LEAFLET_SIGMA_A) / SMALL.voxel_size_a
    for row in tomo.truth:
        centre = _centre(row)
        for bead in tomo.beads:
            assert np.linalg.norm(centre - _centre(bead)) >= row["radius"] + bead["radius"]
        for membrane in tomo.membranes:
            gap = abs(np.linalg.norm(centre - _centre(membrane)) - membrane["radius"])
            assert gap >= row["radius"] + half_width
    assert all(3.0 <= bead["radius"] <= 4.0 for bead in tomo.beads)


@pytest.mark.parametrize("polarity", ["raw", "inverted"])
def test_polarity_sets_the_sign_of_particle_contrast(polarity):
    result = synthesize(replace(SMALL, polarity=polarity), seed=3)
    inside = float(result.volume[result.labels > 0].mean())
    outside = float(result.volume[result.labels == 0].mean())
    assert (inside < outside) if polarity == "raw" else (inside > outside)


@pytest.mark.parametrize("snr", [0.3, 1.0])
def test_noise_variance_matches_the_requested_snr(snr):
    # same seed: same scene and same noise pattern, so the difference is the noise alone
    noisy = synthesize(replace(SMALL, snr=snr), seed=5).volume.astype(np.float64)
    clean = synthesize(replace(SMALL, snr=NOISE_FREE), seed=5).volume.astype(np.float64)
    measured = clean.var() / (noisy - clean).var()
    assert measured == pytest.approx(snr, rel=0.02)


def test_gold_beads_are_the_densest_objects():
    settings = replace(SMALL, polarity="inverted", gold_beads=3)
    clean = synthesize(replace(settings, snr=NOISE_FREE), seed=11)
    noisy = synthesize(settings, seed=11)
    for volume in (clean.volume, ndi.gaussian_filter(noisy.volume, 1.0)):
        peak = np.array(np.unravel_index(int(np.argmax(volume)), volume.shape))
        assert min(np.linalg.norm(peak - _centre(b)) - b["radius"] for b in clean.beads) <= 1.0


def test_missing_wedge_mask_geometry():
    shape = (64, 8, 64)
    mask = missing_wedge_mask(shape, 60.0)
    assert mask.shape == (64, 8, 33) and mask.dtype == bool
    kz, kx = 0.3, 0.1  # steeper than tan(60 deg) = 1.73 from the kx axis: missing
    assert not mask[round(kz * 64), 3, round(kx * 64)] and not mask[-round(kz * 64), 0, round(kx * 64)]
    assert mask[round(kx * 64), 5, round(kz * 64)]  # shallow: measured, for every ky
    assert mask[0, :, 0].all() and mask[0].all()  # kz = 0 plane is always measured
    assert not mask[1:, :, 0].any()  # the kz axis is the centre of the wedge
    assert np.array_equal(mask[:, 0], mask[:, 5])  # tilt about y: ky plays no part
    assert missing_wedge_mask(shape, 90.0).all()
    kz_grid = np.fft.fftfreq(64)[:, None]
    kx_grid = np.fft.rfftfreq(64)[None, :]
    disc = (kz_grid**2 + kx_grid**2 <= 0.25) & (kx_grid > 0)
    # directions are uniform within a disc: 120 of the 180 degrees of the kx > 0 half are measured
    assert mask[:, 0][disc].mean() == pytest.approx(2 / 3, abs=0.02)


def test_noise_free_tomogram_has_no_power_in_the_missing_wedge():
    settings = replace(SMALL, snr=NOISE_FREE, tilt_range=45.0)
    volume = synthesize(settings, seed=2).volume.astype(np.float64)
    power = np.abs(scipy.fft.rfftn(volume - volume.mean())) ** 2
    mask = missing_wedge_mask(settings.shape, settings.tilt_range)
    assert power[~mask].sum() < 1e-9 * power[mask].sum()


def test_missing_wedge_elongates_along_z():
    settings = replace(SMALL, shape=(64, 64, 64), particles_per_class=0, membranes=0, gold_beads=1,
                       snr=NOISE_FREE, polarity="inverted", tilt_range=40.0)
    result = synthesize(settings, seed=1)
    bead = np.round(_centre(result.beads[0])).astype(int)
    volume = result.volume - np.median(result.volume)
    peak = volume[tuple(bead)]

    def width(profile):  # voxels above half the peak
        return int((profile > peak / 2).sum())

    along_z, along_x = volume[:, bead[1], bead[2]], volume[bead[0], bead[1], :]
    assert width(along_z) > width(along_x)


def test_write_dataset_writes_volumes_labels_and_one_truth_table(tmp_path):
    paths = write_dataset(str(tmp_path / "out"), n=2, seed=3, settings=SMALL)
    out = tmp_path / "out"
    assert paths == [str(out / "synth_000.mrc"), str(out / "synth_001.mrc")]
    with open(out / "truth.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == synth.TRUTH_COLUMNS
        rows = list(reader)
    for i, name in enumerate(["synth_000", "synth_001"]):
        expected = synthesize(SMALL, seed=derive_seed(3, i), name=name)
        with mrcfile.open(out / f"{name}.mrc") as mrc:
            assert np.array_equal(mrc.data, expected.volume)
            assert float(mrc.voxel_size.x) == pytest.approx(SMALL.voxel_size_a)
        with mrcfile.open(out / f"{name}_labels.mrc") as mrc:
            labels = np.asarray(mrc.data).astype(np.int32)
        assert np.array_equal(labels, expected.labels)
        mine = [r for r in rows if r["tomogram"] == name]
        assert len(mine) == len(np.unique(labels[labels > 0]))
        assert sorted(int(r["instance_id"]) for r in mine) == sorted(np.unique(labels[labels > 0]).tolist())
        assert float(mine[0]["z"]) == pytest.approx(expected.truth[0]["z"])
    assert derive_seed(3, 0) != derive_seed(3, 1) and derive_seed(3, 0) == derive_seed(3, 0)


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"no real density maps at {DATA_DIR}")
def test_real_maps_render_consistent_instances():
    settings = replace(SMALL, use_real_maps=True, data_dir=str(DATA_DIR))
    result = synthesize(settings, seed=4)
    built_in = synthesize(SMALL, seed=4)
    assert not np.array_equal(result.volume, built_in.volume)
    regions = _regions(result.labels)
    assert set(regions) == {row["instance_id"] for row in result.truth}
    for row in result.truth:
        box = regions[row["instance_id"]]
        assert ndi.label(result.labels[box] == row["instance_id"])[1] == 1
        assert _distance_to_region(result.labels, row["instance_id"], box, _centre(row)) <= 2.0
    for a, b in itertools.combinations(result.truth, 2):
        assert np.linalg.norm(_centre(a) - _centre(b)) >= a["radius"] + b["radius"]
    inside = result.volume[result.labels > 0].mean()
    assert inside < result.volume[result.labels == 0].mean()  # raw polarity: dense is dark


def test_data_dir_resolution(monkeypatch, tmp_path):
    real = replace(SMALL, use_real_maps=True)
    monkeypatch.setenv(synth.DATA_DIR_ENV, str(tmp_path / "nowhere"))
    assert synth.resolve_data_dir(real) is None  # missing default folder: built-in shapes
    assert np.array_equal(synthesize(real, seed=1).volume, synthesize(SMALL, seed=1).volume)
    monkeypatch.setenv(synth.DATA_DIR_ENV, str(tmp_path))
    assert synth.resolve_data_dir(real) == tmp_path
    assert synth.resolve_data_dir(SMALL) is None  # use_real_maps=False wins
    with pytest.raises(ValueError, match="data_dir .* is not a folder"):
        synthesize(replace(real, data_dir=str(tmp_path / "missing")), seed=0)


@pytest.mark.parametrize("changes, message", [
    ({"shape": (8, 64, 64)}, "shape must be"),
    ({"shape": (64, 64)}, "shape must be"),
    ({"snr": 0.0}, "snr must be > 0"),
    ({"snr": -1.0}, "snr must be > 0"),
    ({"tilt_range": 0.0}, r"tilt_range must be in \(0, 90\]"),
    ({"tilt_range": 95.0}, r"tilt_range must be in \(0, 90\]"),
    ({"classes": ("ribosome", "virus")}, r"unknown class 'virus'.*'ball', 'rod'"),
    ({"classes": ("ball", "ball")}, "classes must be one or more distinct"),
    ({"crowding": -0.1}, r"crowding must be a fraction in \[0, 1\]"),
    ({"crowding": 1.5}, r"crowding must be a fraction in \[0, 1\]"),
    ({"crowding": float("nan")}, r"crowding must be a fraction in \[0, 1\]"),
    ({"classes": ()}, "classes must be"),
    ({"polarity": "bright"}, "polarity must be one of"),
    ({"gold_beads": -1}, "gold_beads must be"),
    ({"voxel_size_a": 0.0}, "voxel_size_a must be"),
])
def test_bad_settings_raise_specific_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **changes)


def test_negative_seed_is_rejected():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        synthesize(SMALL, seed=-1)


def test_default_settings_are_fast_and_well_packed():
    synthesize(SynthSettings(), seed=0)  # warm the template cache
    start = time.perf_counter()
    result = synthesize(SynthSettings(), seed=1)
    elapsed = time.perf_counter() - start
    assert result.volume.shape == (96, 192, 192)
    assert len(result.truth) >= 0.75 * 3 * 12  # most attempted particles fit
    assert elapsed < 10.0, f"default synthesis took {elapsed:.1f} s"


# ---------------------------------------------------------------- ball, rod, crowding, prompts


def _instance_voxels(labels: np.ndarray, instance_id: int) -> np.ndarray:
    return np.argwhere(labels == instance_id).astype(float)


@pytest.mark.parametrize("voxel_size", [10.0, 5.0])
def test_ball_and_rod_render_at_their_physical_size(voxel_size):
    # 90 A ball, 70 x 320 A rod: 9 and 7 x 32 voxels at 10 A/px, twice that at 5 A/px
    depth = 48 if voxel_size == 10.0 else 80  # a 5 A rod needs 2 x (33 + 2) voxels
    settings = SynthSettings(shape=(depth, 96, 96), voxel_size_a=voxel_size, classes=("ball", "rod"),
                             particles_per_class=2, membranes=0, gold_beads=0, use_real_maps=False)
    result = synthesize(settings, seed=1)
    assert {row["class"] for row in result.truth} == {"ball", "rod"}
    for row in result.truth:
        voxels = _instance_voxels(result.labels, row["instance_id"])
        centre = voxels.mean(axis=0)
        if row["class"] == "ball":
            diameter = (6 * len(voxels) / math.pi) ** (1 / 3)  # of the sphere with this volume
            assert diameter == pytest.approx(90 / voxel_size, rel=0.1)
            assert row["radius"] == pytest.approx(45 / voxel_size + 1, abs=1.0)  # bounding radius + 1
        else:  # any orientation: measure along and across the principal axis
            axis = np.linalg.svd(voxels - centre, full_matrices=False)[2][0]
            along = (voxels - centre) @ axis
            across = np.linalg.norm((voxels - centre) - along[:, None] * axis, axis=1)
            assert np.ptp(along) + 1 == pytest.approx(320 / voxel_size, rel=0.08)
            assert 2 * np.median(across[np.abs(along) < 0.3 * np.ptp(along)]) + 1 == pytest.approx(
                70 / voxel_size, rel=0.25)  # median over the straight part: half the points lie inside
            assert 2 * across.max() + 1 == pytest.approx(70 / voxel_size, abs=2.0)
            assert row["radius"] == pytest.approx(160 / voxel_size + 1, abs=1.0)


@pytest.mark.parametrize("voxel_size", [10.0, 5.0])
def test_builtin_ball_and_rod_templates_scale_with_voxel_size(voxel_size):
    for cls, sides_a in (("ball", (90, 90, 90)), ("rod", (320, 70, 70))):  # the rod lies along z
        tmpl = synth_shapes.template(cls, voxel_size, None)
        mask = tmpl.density > synth_shapes.LABEL_LEVEL
        extent = [int(np.ptp(np.nonzero(mask)[axis])) + 1 for axis in range(3)]
        assert extent == pytest.approx([a / voxel_size for a in sides_a], abs=1.0)
        assert mask[tuple(np.round(tmpl.centre).astype(int))]
    assert "ball" not in synth_shapes.MAP_FILES and "rod" not in synth_shapes.MAP_FILES  # always built-in


def test_default_classes_are_unchanged_and_new_ones_are_opt_in():
    assert SynthSettings().classes == ("ribosome", "atpase", "hsp60") == synth.DEFAULT_CLASSES
    assert SynthSettings().crowding == 0.0
    assert set(synth.CLASSES) == {"ribosome", "atpase", "hsp60", "ball", "rod"}


def _neighbour_gap(labels: np.ndarray, instance_id: int) -> float:
    """Distance (voxels) from an instance's mask to the nearest voxel of any other instance."""
    own = labels == instance_id
    others = (labels > 0) & ~own
    return float(ndi.distance_transform_edt(~own)[others].min()) if others.any() else math.inf


def _check_labels_match_truth(result, shape):
    regions = _regions(result.labels)
    assert set(regions) == {row["instance_id"] for row in result.truth}
    for row in result.truth:
        instance_id, centre = row["instance_id"], _centre(row)
        box = regions[instance_id]
        assert ndi.label(result.labels[box] == instance_id)[1] == 1, f"instance {instance_id} is split"
        voxels = np.argwhere(result.labels[box] == instance_id) + [s.start for s in box]
        assert np.sqrt(((voxels - centre) ** 2).sum(axis=1)).max() <= row["radius"]
        # the centre is on its own particle, never on a neighbour's
        assert result.labels[tuple(np.round(centre).astype(int))] in (0, instance_id)
        assert _distance_to_region(result.labels, instance_id, box, centre) <= 2.0
        assert np.all(centre >= row["radius"]) and np.all(centre <= np.array(shape) - 1 - row["radius"])


@pytest.mark.parametrize("seed", [0, 1])
def test_crowding_puts_particles_in_contact_without_overlap(seed):
    free = synthesize(MIXED, seed=seed)
    crowded = synthesize(replace(MIXED, crowding=0.75), seed=seed)
    free_gaps = [_neighbour_gap(free.labels, row["instance_id"]) for row in free.truth]
    gaps = np.array([_neighbour_gap(crowded.labels, row["instance_id"]) for row in crowded.truth])
    assert min(free_gaps) > 2.0  # without crowding every particle keeps a free margin
    assert len(crowded.truth) >= 6
    # touching: another instance's label within 1-2 voxels (adjacent voxels: 1 to sqrt 3)
    assert (gaps <= 2.0).mean() >= 0.5, gaps
    assert gaps.min() >= 1.0  # never overlapping: each voxel one instance id
    _check_labels_match_truth(crowded, MIXED.shape)


def test_full_crowding_touches_almost_every_particle_and_keeps_truth_consistent():
    settings = replace(MIXED, crowding=1.0, use_real_maps=True)  # real maps where present: odd shapes
    result = synthesize(settings, seed=3)
    gaps = np.array([_neighbour_gap(result.labels, row["instance_id"]) for row in result.truth])
    assert (gaps <= 2.0).mean() >= 0.8, gaps
    _check_labels_match_truth(result, settings.shape)


def test_crowded_synthesis_is_deterministic_for_a_seed():
    settings = replace(MIXED, crowding=0.5)
    first, again = synthesize(settings, seed=5), synthesize(settings, seed=5)
    assert np.array_equal(first.volume, again.volume) and np.array_equal(first.labels, again.labels)
    assert first.truth == again.truth and first.beads == again.beads
    other = synthesize(settings, seed=6)
    assert [_centre(r).tolist() for r in other.truth] != [_centre(r).tolist() for r in first.truth]
    # crowding 0 draws nothing from the crowding stream: the same scene as the default
    assert np.array_equal(synthesize(replace(MIXED, crowding=0.0), seed=5).labels,
                          synthesize(MIXED, seed=5).labels)


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("per_class", [1, 3])
def test_prompts_per_class_are_the_first_particles_of_each_class(tmp_path, per_class):
    settings = replace(MIXED, classes=("ball", "rod"), particles_per_class=2, membranes=0)
    write_dataset(str(tmp_path), n=2, seed=2, settings=settings, prompts_per_class=per_class)
    truth, prompts = _read_csv(tmp_path / "truth.csv"), _read_csv(tmp_path / "prompts.csv")
    assert list(prompts[0]) == list(synth.PROMPT_COLUMNS)
    expected = []
    for cls in dict.fromkeys(row["class"] for row in truth):  # classes in order of first appearance
        expected += [{k: row[k] for k in synth.PROMPT_COLUMNS} for row in truth if row["class"] == cls][:per_class]
    assert prompts == expected
    counts = {cls: sum(p["class"] == cls for p in prompts) for cls in ("ball", "rod")}
    assert counts == {"ball": per_class, "rod": per_class}  # 4 of each class in the dataset
    if per_class == 3:
        assert {p["tomogram"] for p in prompts} == {"synth_000", "synth_001"}  # spans tomograms


def test_prompts_per_class_below_one_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="prompts_per_class must be an integer >= 1; got 0"):
        write_dataset(str(tmp_path), n=1, settings=MIXED, prompts_per_class=0)
    assert not list(tmp_path.iterdir())  # checked before any work


def test_cli_synth_new_flags(tmp_path):
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--n", "1", "--shape", "48", "96", "96", "--builtin-shapes",
                 "--classes", "ball", "rod", "--crowding", "0.5", "--prompts-per-class", "2"]) == 0
    truth, prompts = _read_csv(out / "truth.csv"), _read_csv(out / "prompts.csv")
    assert {row["class"] for row in truth} == {"ball", "rod"}
    assert sorted(p["class"] for p in prompts) == ["ball", "ball", "rod", "rod"]
    settings = SynthSettings(shape=(48, 96, 96), classes=("ball", "rod"), crowding=0.5, use_real_maps=False)
    with mrcfile.open(out / "synth_000_labels.mrc") as mrc:
        assert np.array_equal(mrc.data, synthesize(settings, seed=derive_seed(0, 0)).labels)


@pytest.mark.parametrize("flags, message", [
    (["--crowding", "1.5"], r"synth\.crowding: Input should be less than or equal to 1"),
    (["--classes", "ribosome", "virus"], r"synth\.classes: .*unknown class 'virus'.*ball, rod"),
    (["--prompts-per-class", "0"], r"synth\.prompts_per_class: Input should be greater than or equal to 1"),
])
def test_cli_synth_rejects_bad_values_by_key(tmp_path, capsys, flags, message):
    assert main(["synth", "--out", str(tmp_path / "x"), "--builtin-shapes", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_config_validates_synth_classes_and_crowding():
    cfg = load_config(None, {"synth.classes": ["ball", "rod"], "synth.crowding": 0.3, "synth.prompts_per_class": 4})
    assert cfg.synth.classes == ("ball", "rod") and cfg.synth.crowding == 0.3 and cfg.synth.prompts_per_class == 4
    with pytest.raises(ConfigError, match=r"synth\.classes: .*distinct"):
        load_config(None, {"synth.classes": ["ball", "ball"]})
    with pytest.raises(ConfigError, match=r"synth\.crowding"):
        load_config(None, {"synth.crowding": -0.2})
