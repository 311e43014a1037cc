"""A class's size learnt from its candidates: a single prompt's wide size band, fragments
dropped against the strong candidates' size, a leaky prompt searched again at their scale,
and picks placed on one blob peak merged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from cryosam_ray.config import load_config
from cryosam_ray.evaluate import match_points
from cryosam_ray.executors.in_process import run_in_process
from cryosam_ray.particle import ClassQuery, Particle, equivalent_radius
from cryosam_ray.propagation import Instance
from cryosam_ray.stages.particles import score_cut, without_duplicates
from cryosam_ray.stages.sizes import drop_fragments, rescaled_query, size_band, strong_sizes
from cryosam_ray.tables import read_picks
from cryosam_ray.tomo_io import open_tomogram, write_mrc

BALL_RADIUS = 4
SINGLES = [(z, y, x) for z in (16, 40) for y in (16, 48, 80) for x in (16, 80)]
COLUMN = [(16, 48, 48), (24, 48, 48), (32, 48, 48), (40, 48, 48)]  # four balls touching along z


def _particle(voxels: int, score: float, centre=None, source: str = "match") -> Particle:
    instance = Instance(prompt=(0.0, 0.0, 0.0), bbox=(0, 0, 0, 1, 1, voxels), mask=np.ones((1, 1, voxels), bool))
    return Particle("ball", instance, source, score=score, centre=centre)


def _query(voxels: float, prompts: int) -> ClassQuery:
    return ClassQuery("ball", np.ones(4, np.float32), np.zeros(4), voxels, equivalent_radius(voxels),
                      shells=np.zeros(16), max_size_factor=2.0 if prompts < 2 else 1.0)


def test_a_single_prompts_band_is_wide_then_narrowed_by_the_strong_candidates():
    cfg = load_config(None, {})  # min_size_ratio 0.5, max_size_ratio 2
    single, several = _query(1000.0, 1), _query(1000.0, 3)
    assert size_band(single, cfg) == (250.0, 4000.0)
    assert size_band(several, cfg) == (500.0, 2000.0)
    sizes = [100, 180, 220, 400, 410, 420, 430]
    found = [_particle(v, s) for v, s in zip(sizes, [0.1, 0.2, 0.3, 5.0, 5.1, 5.2, 5.3])]
    cut = score_cut(np.array([p.score for p in found]), "auto", "density")
    assert cut == pytest.approx(2.65)  # Otsu: between 0.3 and 5.0
    strong = strong_sizes(found, cut)
    assert strong.tolist() == [400, 410, 420, 430]
    sizes_kept = lambda kept: [p.instance.voxel_count for p in kept]  # noqa: E731
    # the smaller of the prompt (1000) and the strong median (415), times 0.5: 207.5
    assert sizes_kept(drop_fragments(found, single, strong, cfg)) == [220, 400, 410, 420, 430]
    # a prompt smaller than its candidates keeps its own bound; none learnt: the prompt's
    assert sizes_kept(drop_fragments(found, _query(300.0, 1), strong, cfg)) == [180, 220, 400, 410, 420, 430]
    assert sizes_kept(drop_fragments(found, single, np.zeros(0), cfg)) == []
    # several prompts: the band was applied when propagating; the paper's null ratio: no band
    assert drop_fragments(found, several, strong, cfg) == found
    assert drop_fragments(found, single, strong, load_config(None, {"instances.min_size_ratio": None})) == found
    assert strong_sizes(found[:3], cut).size == 0  # too few to learn from


def test_particles_placed_on_one_blob_peak_are_one():
    found = [_particle(300, 1.0, (10.0, 10.0, 10.0)), _particle(400, 2.0, (10.5, 10.0, 10.0)),
             _particle(400, 0.5, (10.0, 10.0, 13.0)), _particle(100, float("nan"), (10.0, 10.2, 13.0))]
    kept = without_duplicates(found, 2.0)
    assert kept == [found[1], found[2]]  # the better of each pair, in input order


@pytest.fixture(scope="module")
def column_scene(tmp_path_factory):
    """Dark balls of radius 4 on noise: 12 apart, 4 touching along z in one column (a prompt
    there gives one mask of all four, as z-stacked ribosomes do in a crowded cytoplasm)."""
    root = tmp_path_factory.mktemp("column")
    rng = np.random.default_rng(0)
    shape = (56, 96, 96)
    zz, yy, xx = np.indices(shape)
    volume = np.zeros(shape, np.float32)
    for c in SINGLES + COLUMN:
        volume -= ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= BALL_RADIUS ** 2).astype(np.float32)
    volume = ndimage.gaussian_filter(volume, 0.7) + rng.normal(0, 0.3, shape).astype(np.float32)
    write_mrc(root / "column.mrc", volume, 10.0)
    return root


def test_an_atypical_prompt_is_searched_again_at_its_candidates_scale(column_scene):
    tomogram = open_tomogram(column_scene / "column.mrc")
    cfg = load_config("demo")
    prompt = _particle(1450, 3.0)
    prompt.instance = Instance(prompt=(24.0, 48.0, 48.0), bbox=(12, 44, 44, 45, 53, 53),
                               mask=np.ones((33, 9, 9), bool))
    query = _query(1450.0, 1)
    strong = np.array([300.0, 350, 380, 390, 400, 410, 420, 450, 900])  # quartiles 380-420, median 400
    again = rescaled_query(query, strong, [prompt], tomogram, cfg)
    assert again.median_voxels == 400.0 and again.radius == pytest.approx(equivalent_radius(400.0))
    assert again.shells.shape == query.shells.shape and np.abs(again.shells).max() > 0
    assert (again.cls, again.polarity, again.max_size_factor) == (query.cls, query.polarity, 2.0)
    assert rescaled_query(_query(300.0, 1), strong, [prompt], tomogram, cfg).median_voxels == 400.0  # too small
    assert rescaled_query(_query(410.0, 1), strong, [prompt], tomogram, cfg) is None  # a typical size: kept
    assert rescaled_query(query, strong[:7], [prompt], tomogram, cfg) is None  # too few to trust quartiles
    assert rescaled_query(_query(1450.0, 3), strong, [prompt], tomogram, cfg) is None  # several prompts
    assert rescaled_query(query, strong, [], tomogram, cfg) is None  # no prompt here to measure


def test_a_prompt_joined_with_its_neighbours_still_finds_the_single_particles(column_scene):
    """The prompt's mask is the whole column (about 3.7 balls): with the band at 0.5-4x of it no
    single ball passed (recall 0). Learnt from the candidates, every single ball is picked once."""
    prompts = column_scene / "prompts.csv"
    prompts.write_text("tomogram,z,y,x,class\ncolumn,24,48,48,ball\n")
    run_in_process([str(column_scene / "column.mrc")], str(prompts), str(column_scene / "run"), load_config("demo"))
    picks = read_picks(str(column_scene / "run" / "picks.parquet")).to_pandas()
    matches = picks[np.isfinite(picks["similarity"])]  # the prompt's row has none
    pairs = match_points(matches[["z", "y", "x"]].to_numpy(), np.array(SINGLES, float), 2.0)
    assert len(pairs) == len(SINGLES)
    assert len(matches) <= len(SINGLES) + 1
