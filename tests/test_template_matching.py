"""The template-matching baseline (benchmarks/template_matching.py): rotations, NCC, peaks, cut-off."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import template_matching as tm  # noqa: E402

HALF = 5
# Well-separated planted centres (>= 22 voxels apart) in a 48^3 volume, and the cube rotation
# (index into rotations_24) of each copy; index 0 is the identity.
CENTRES = np.array([(12, 12, 12), (12, 34, 30), (34, 14, 32), (34, 34, 14)])
ROTATION_IDS = [0, 5, 13, 22]


def asymmetric_template(half: int = HALF) -> np.ndarray:
    """Gaussian blobs on arms of different lengths and weights: no cube rotation but the identity fixes it."""
    grid = np.indices((2 * half + 1,) * 3, dtype=np.float64) - half
    out = np.zeros(grid.shape[1:])
    for offset, weight in [((0, 0, 0), 1.0), ((3, 0, 0), 0.8), ((0, 2, 0), 0.6), ((0, 0, 1), 0.4),
                           ((-2, -2, 0), 0.5)]:
        out += weight * np.exp(-sum((g - o) ** 2 for g, o in zip(grid, offset)) / 2.0)
    return out.astype(np.float32)


def box(centre) -> tuple[slice, ...]:
    return tuple(slice(c - HALF, c + HALF + 1) for c in centre)


@pytest.fixture(scope="module")
def planted():
    """Dark copies of the asymmetric template, each turned by a different cube rotation, in noise."""
    template = asymmetric_template()
    rotations = tm.rotations_24()
    volume = np.random.default_rng(0).normal(scale=0.3, size=(48, 48, 48)).astype(np.float32)
    for centre, rid in zip(CENTRES, ROTATION_IDS):
        volume[box(centre)] += tm.rotate_template(template, rotations[rid])
    return -volume, -template  # dark density: polarity comes with the template


def test_rotations_24_form_the_cube_group():
    rotations = tm.rotations_24()
    assert len(rotations) == 24
    assert np.array_equal(rotations[0], np.eye(3))
    keys = {r.tobytes() for r in rotations}
    assert len(keys) == 24  # distinct
    for r in rotations:
        assert set(np.unique(r)) <= {-1, 0, 1}
        assert np.array_equal(r @ r.T, np.eye(3))
        assert round(np.linalg.det(r)) == 1
    for a, b in itertools.product(rotations, repeat=2):
        assert (a @ b).astype(rotations[0].dtype).tobytes() in keys  # closed under composition


def test_random_rotations_are_seeded_proper_rotations():
    first = tm.random_rotations(8, seed=3)
    assert len(first) == 8
    for r in first:
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_array_equal(np.stack(first), np.stack(tm.random_rotations(8, seed=3)))
    assert not np.allclose(np.stack(first), np.stack(tm.random_rotations(8, seed=4)))


def test_rotate_template_moves_offset_v_to_R_v():
    template = np.zeros((7, 7, 7), dtype=np.float32)
    v = np.array([1, -2, 3])
    template[tuple(v + 3)] = 1.0
    for r in tm.rotations_24():
        rotated = tm.rotate_template(template, r)
        assert rotated[tuple(r @ v + 3)] == 1.0 and rotated.sum() == 1.0


@pytest.mark.parametrize("embed", [False, True], ids=["alone", "in-noise"])
def test_ncc_of_template_with_itself_is_one_at_centre(embed):
    template = asymmetric_template()
    if embed:
        volume = np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32)
        centre = (14, 17, 15)
        volume[box(centre)] = template
    else:
        volume, centre = template, (HALF,) * 3
    ncc = tm.match_template(volume, template, rotations=[np.eye(3)])
    assert ncc.shape == volume.shape and ncc.dtype == np.float32
    assert ncc[centre] == pytest.approx(1.0, abs=1e-4)
    assert ncc.min() >= -1.0 and ncc.max() <= 1.0
    assert np.unravel_index(np.argmax(ncc), ncc.shape) == centre


def test_interpolated_rotation_matches_its_own_copy():
    template = asymmetric_template()
    rotation = tm.random_rotations(1, seed=7)[0]
    volume = np.random.default_rng(2).normal(scale=0.1, size=(32, 32, 32)).astype(np.float32)
    volume[box((16, 16, 16))] = tm.rotate_template(template, rotation)
    ncc = tm.match_template(volume, template, rotations=[rotation])
    assert ncc[16, 16, 16] == pytest.approx(1.0, abs=1e-4)


def test_planted_rotated_copies_are_the_top_picks(planted):
    volume, template = planted
    ncc = tm.match_template(volume, template)
    picks, scores = tm.pick_peaks(ncc, radius=6, top_k=len(CENTRES) + 1)
    top = picks[: len(CENTRES)]
    distance = np.linalg.norm(top[:, None, :] - CENTRES[None, :, :], axis=-1)
    assert np.all(distance.min(axis=0) <= 1.0), f"missed a planted centre; picks {top.tolist()}"
    assert np.all(distance.min(axis=1) <= 1.0)
    assert scores[-1] < scores[len(CENTRES) - 1] - 0.1  # clear margin to the best background peak
    # The rotations matter: the identity alone scores the turned copies lower.
    identity_only = tm.match_template(volume, template, rotations=[np.eye(3)])
    for centre, rid in zip(CENTRES, ROTATION_IDS):
        if rid:
            assert ncc[tuple(centre)] > identity_only[tuple(centre)] + 0.03


def test_prompt_template_then_matching_finds_every_copy():
    """End to end with a template averaged from two dark prompts (same orientation copies)."""
    template = asymmetric_template()
    centres = np.array([(10, 10, 10), (10, 30, 36), (36, 12, 30), (36, 36, 12), (24, 24, 24)])
    volume = np.random.default_rng(3).normal(scale=0.3, size=(48, 48, 48)).astype(np.float32)
    for centre in centres:
        volume[box(centre)] -= template
    averaged = tm.prompt_template(volume, centres[:2] + 0.3, HALF)  # rounded to the voxel
    assert averaged.shape == (2 * HALF + 1,) * 3 and averaged.dtype == np.float32
    picks, _ = tm.pick_peaks(tm.match_template(volume, averaged), radius=6, top_k=len(centres))
    distance = np.linalg.norm(picks[:, None, :] - centres[None, :, :], axis=-1)
    assert np.all(distance.min(axis=0) <= 1.0)


def test_prompt_template_standardises_reflects_and_skips():
    volume = np.random.default_rng(4).normal(size=(20, 20, 20))
    inner = volume[8:13, 8:13, 8:13]
    expected = (inner - inner.mean()) / inner.std()
    np.testing.assert_allclose(tm.prompt_template(volume * 5 + 2, [(10.4, 9.6, 10.2)], 2), expected, rtol=1e-5,
                               atol=1e-5)
    # Edge box: mirror reflection without repeating the edge voxel (np.pad "reflect").
    padded = np.pad(volume, 2, mode="reflect")
    edge = padded[0:5, 0:5, 0:5]
    np.testing.assert_allclose(tm.prompt_template(volume, [(0, 0, 0)], 2), (edge - edge.mean()) / edge.std(),
                               rtol=1e-5, atol=1e-5)
    # A prompt whose box is entirely outside is skipped; none left is an error.
    np.testing.assert_allclose(tm.prompt_template(volume, [(10, 10, 10), (-5, 10, 10)], 2), expected, rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="no usable prompt box"):
        tm.prompt_template(volume, [(-5, 10, 10)], 2)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        tm.prompt_template(volume, [(1, 2)], 2)


def test_pick_peaks_greedy_nms_best_first():
    score = np.zeros((20, 20, 20), dtype=np.float32)
    score[5, 5, 5], score[5, 5, 8], score[15, 15, 15], score[5, 15, 5] = 1.0, 0.9, 0.8, 0.5
    score[0, 19, 19] = np.nan
    picks, scores = tm.pick_peaks(score, radius=4, min_score=0.4)
    np.testing.assert_array_equal(picks, [[5, 5, 5], [15, 15, 15], [5, 15, 5]])  # (5,5,8) suppressed
    np.testing.assert_allclose(scores, [1.0, 0.8, 0.5])
    picks, _ = tm.pick_peaks(score, radius=4, min_score=0.6, top_k=1)
    np.testing.assert_array_equal(picks, [[5, 5, 5]])
    picks, scores = tm.pick_peaks(score, radius=2, min_score=0.4)
    assert len(picks) == 4 and picks.dtype == np.float64


def test_best_f1_cutoff_hand_example():
    truth = [(0, 0, 0), (0, 0, 20), (0, 20, 0)]
    picks = np.array([(0, 0, 1), (0, 0, 21), (0, 0, 0.5), (0, 19, 0), (20, 20, 20)], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # Ranked: TP, TP, FP (second pick on truth 0), TP, FP -> F1 by k: .5, .8, .667, .857, .75.
    order = np.random.default_rng(5).permutation(len(picks))
    result = tm.best_f1_cutoff(picks[order], scores[order], truth, truth_radius=4)  # match within 2
    assert result.threshold == 0.6
    assert result.f1 == pytest.approx(6 / 7)
    assert (result.precision, result.recall) == (pytest.approx(0.75), pytest.approx(1.0))
    # Within 0.8 voxels only the third pick matches: best is k = 3, F1 = 2 / 6.
    threshold, f1, precision, recall = tm.best_f1_cutoff(picks, scores, truth, truth_radius=4, radius_fraction=0.2)
    assert threshold == 0.7 and f1 == pytest.approx(1 / 3)
    assert precision == pytest.approx(1 / 3) and recall == pytest.approx(1 / 3)


def test_best_f1_cutoff_never_splits_tied_scores_and_handles_empty():
    truth = [(0, 0, 0)]
    picks = [(9, 9, 9), (0, 0, 0), (5, 5, 5)]
    # Keeping the top 2 (F1 .667) would split the tie at 0.8; the best allowed is all 3 (F1 .5).
    result = tm.best_f1_cutoff(picks, [0.9, 0.8, 0.8], truth, truth_radius=2)
    assert result.threshold == 0.8 and result.f1 == pytest.approx(0.5)
    empty = tm.best_f1_cutoff(np.zeros((0, 3)), np.zeros(0), truth, truth_radius=2)
    assert empty.threshold == math.inf and empty.f1 == 0.0 and empty.recall == 0.0
