"""Masks holding particles stacked along z are cut into one candidate per particle; a dimer,
a filament or a particle drawn out by the missing wedge stays whole, and a class whose prompts
hold several blobs is picked between them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryosam_ray.config import load_config
from cryosam_ray.density import DensityMap, strong_peaks, z_stretch
from cryosam_ray.evaluate import match_points
from cryosam_ray.executors.in_process import run_in_process
from cryosam_ray.particle import ClassQuery
from cryosam_ray.propagation import Instance
from cryosam_ray.stages.stacks import blob_peaks_in, particle_peaks, split_stack
from cryosam_ray.tables import read_picks
from cryosam_ray.tomo_io import open_tomogram, write_mrc

RADIUS = 5.0


def _query(span: float = 0.0, stretch: float = 1.0) -> ClassQuery:
    return ClassQuery("ball", np.ones(4, np.float32), np.zeros(4), 500.0, RADIUS, blob_span=span, z_stretch=stretch)


def _column(offset: tuple[int, int, int]) -> tuple[Instance, np.ndarray]:
    """Two balls of radius 5 at (10, 20, 20) and (10, 20, 20) + ``offset``, joined into one mask
    (their hull, as a threshold joins them), in a (40, 40, 40) box; and their centres."""
    centres = np.array([(10, 20, 20), np.add((10, 20, 20), offset)], np.float64)
    grid = np.indices((40, 40, 40)).reshape(3, -1).T
    axis = centres[1] - centres[0]
    t = np.clip(((grid - centres[0]) @ axis) / max(float(axis @ axis), 1.0), 0, 1)
    nearest = centres[0] + t[:, None] * axis
    mask = (np.linalg.norm(grid - nearest, axis=1) <= RADIUS).reshape(40, 40, 40)
    return Instance(prompt=tuple(centres[0]), bbox=(0, 0, 0, 40, 40, 40), mask=mask), centres


def test_a_column_of_two_particles_is_cut_between_their_peaks():
    inst, centres = _column((14, 0, 0))  # 14 apart along z: more than a diameter (10)
    peaks = np.vstack([centres, [(30.0, 30.0, 30.0)]])  # the third lies outside the mask
    pieces = split_stack(inst, peaks, np.array([2.0, 1.5, 9.0]), _query())
    assert [p.prompt for p in pieces] == [(10.0, 20.0, 20.0), (24.0, 20.0, 20.0)]  # strongest first
    assert sum(p.voxel_count for p in pieces) == inst.voxel_count
    for piece, other in zip(pieces, centres[::-1]):
        own = np.argwhere(piece.mask) + np.array(piece.bbox[:3])
        to_mine = np.linalg.norm(own - np.array(piece.prompt), axis=1)
        assert np.all(to_mine <= np.linalg.norm(own - other, axis=1))  # each voxel with its nearest peak
        assert piece.bbox == (*own.min(axis=0), *(own.max(axis=0) + 1))


@pytest.mark.parametrize("offset, query, why", [
    ((9, 0, 0), _query(), "closer than a diameter: one particle"),
    ((0, 14, 0), _query(), "side by side in a slice: the 2D segmenter's to cut"),
    ((14, 0, 0), _query(span=6.0), "the class's own blobs lie this far apart (a dimer, a filament)"),
    ((14, 0, 0), _query(stretch=1.6), "the missing wedge draws one particle out this far along z"),
])
def test_what_one_particle_can_hold_is_not_cut(offset, query, why):
    inst, centres = _column(offset)
    assert split_stack(inst, centres, np.array([2.0, 1.5]), query) == [inst], why


def test_weak_peaks_inside_a_mask_are_noise():
    inst, centres = _column((14, 0, 0))
    assert split_stack(inst, centres, np.array([2.0, 0.9]), _query()) == [inst]  # under half the strongest
    peaks, response = blob_peaks_in(inst, centres, np.array([2.0, 0.9]))
    assert peaks.tolist() == centres.tolist() and response.tolist() == [2.0, 0.9]
    assert strong_peaks(peaks, response)[0].tolist() == [centres[0].tolist()]
    assert particle_peaks(np.zeros((0, 3)), np.zeros(0), _query()).shape == (0, 3)


def test_a_prompts_blobs_span_and_stretch(tmp_path):
    """A dark dumbbell (two balls 14 apart along x) spans its two blobs, a ball doesn't; a ball
    drawn out 1.5x along z stretches 1.5x, a round one 1x."""
    grid = np.indices((48, 48, 64)).astype(np.float64)

    def ball(centre, stretch=1.0):
        return ((grid[0] - centre[0]) / stretch) ** 2 + (grid[1] - centre[1]) ** 2 + (grid[2] - centre[2]) ** 2 <= 16

    dumbbell = ball((24, 24, 25)) | ball((24, 24, 39))
    write_mrc(tmp_path / "dumbbell.mrc", -dumbbell.astype(np.float32), 10.0)
    dmap = DensityMap(open_tomogram(tmp_path / "dumbbell.mrc"))
    assert dmap.profile(np.array([24.0, 24.0, 25.0]), np.argwhere(dumbbell), 4.0).span == pytest.approx(14.0, abs=1.0)
    assert dmap.profile(np.array([24.0, 24.0, 25.0]), np.argwhere(ball((24, 24, 25))), 4.0).span == 0.0
    assert z_stretch(np.argwhere(ball((24, 24, 25), 1.5))) == pytest.approx(1.5, abs=0.05)
    assert z_stretch(np.argwhere(ball((24, 24, 25)))) == pytest.approx(1.0, abs=0.01)


def _scene(root, name: str, balls: list, necks: list) -> None:
    """Dark balls of radius 4 (centres ``balls``) and necks of radius 2 joining pairs of them
    (``necks``: pairs of centres), lightly blurred, on noise."""
    shape = (44, 96, 96)
    zz, yy, xx = np.indices(shape)
    volume = np.zeros(shape, np.float32)
    for c in balls:
        volume -= ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 16).astype(np.float32)
    for a, b in necks:
        grid = np.stack([zz, yy, xx], -1).astype(np.float64)
        t = np.clip(((grid - a) @ np.subtract(b, a)) / np.sum(np.subtract(b, a) ** 2), 0, 1)[..., None]
        volume -= (np.linalg.norm(grid - (np.asarray(a) + t * np.subtract(b, a)), axis=-1) <= 2).astype(np.float32)
    volume = ndimage.gaussian_filter(np.maximum(volume, -1), 0.7)
    volume += np.random.default_rng(0).normal(0, 0.2, shape).astype(np.float32)
    write_mrc(root / f"{name}.mrc", volume, 10.0)


def _picks(root, name: str, prompt, stacks: bool = True) -> np.ndarray:
    (root / f"{name}.csv").write_text(f"tomogram,z,y,x,class\n{name},{prompt[0]},{prompt[1]},{prompt[2]},ball\n")
    # every candidate (no score cut): what is found, not where the cut falls
    cfg = load_config("demo", {"instances.min_score": None, "density.stacks": stacks})
    out = root / f"{name}_{stacks}"
    run_in_process([str(root / f"{name}.mrc")], str(root / f"{name}.csv"), str(out), cfg)
    return read_picks(str(out / "picks.parquet")).to_pandas()[["z", "y", "x"]].to_numpy()


SINGLES = [(20, y, x) for y in (16, 48, 80) for x in (16, 80)]
STACKS = [((14, y, 48), (26, y, 48)) for y in (16, 48, 80)]  # two balls 12 apart along z, joined


def test_particles_stacked_along_z_are_each_picked(tmp_path):
    """One mask holds both balls of a stack (the neck joins them, as the missing wedge joins
    stacked ribosomes); cut between their blobs, each ball is picked once. Uncut
    (``density.stacks: false``), each stack gives one pick: 9 of the 12 balls."""
    balls = SINGLES + [ball for stack in STACKS for ball in stack]
    _scene(tmp_path, "stacks", balls, STACKS)
    picks = _picks(tmp_path, "stacks", SINGLES[0])
    assert len(match_points(picks, np.array(balls, float), 2.0)) == len(balls)
    assert len(picks) <= len(balls) + 1
    uncut = _picks(tmp_path, "stacks", SINGLES[0], stacks=False)
    assert len(match_points(uncut, np.array(balls, float), 2.0)) == len(SINGLES) + len(STACKS)


def test_a_dimer_is_picked_whole_at_its_centre(tmp_path):
    """Dumbbells (two balls 12 apart across a slice, joined): the prompt's blobs span 12 voxels,
    so no dumbbell is cut and each pick lies at its middle, not on one of its balls."""
    dumbbells = [((20, y, x - 6), (20, y, x + 6)) for y in (16, 48, 80) for x in (20, 70)]
    _scene(tmp_path, "dimers", [ball for pair in dumbbells for ball in pair], dumbbells)
    middles = np.array([np.mean(pair, axis=0) for pair in dumbbells])
    picks = _picks(tmp_path, "dimers", middles[0])
    assert len(match_points(picks, middles, 2.0)) == len(dumbbells)
    assert len(picks) <= len(dumbbells) + 1


def test_a_class_takes_its_prompts_median_span_and_least_stretch():
    """One odd prompt (a dimer's span where the others show one blob; a mask joined with a z
    neighbour, drawn out 2.6x) does not set the class's reach."""
    from cryosam_ray.density import DensityProfile
    from cryosam_ray.particle import QueryPart
    from cryosam_ray.stages.query import combine_queries

    profiles = [DensityProfile(np.zeros(4), 1.0, -1.0, span, stretch)
                for span, stretch in [(0, 1.1), (0, 1.4), (14, 2.6)]]
    part = QueryPart("ball", np.ones(4), np.zeros(4), 1500, [500, 500, 500], profiles)
    query = combine_queries([part])["ball"]
    assert (query.blob_span, query.z_stretch) == (0.0, 1.1)
    alone = QueryPart("ball", np.ones(4), np.zeros(4), 500, [500], profiles[2:])
    assert combine_queries([alone])["ball"].blob_span == 14
