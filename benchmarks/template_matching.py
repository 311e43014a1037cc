"""One-shot template-matching baseline: NCC of the averaged prompt box over rotations.

The quality benchmark compares the picker against this classical baseline::

    import sys; sys.path.insert(0, "<repo>/benchmarks")
    import template_matching as tm

    template = tm.prompt_template(volume, prompts_zyx, half_size=12)     # (25, 25, 25)
    ncc = tm.match_template(volume, template)                            # (D, H, W) in [-1, 1]
    picks, scores = tm.pick_peaks(ncc, radius=10)                        # best first
    cut = tm.best_f1_cutoff(picks, scores, truth_zyx, truth_radius=10)   # oracle cut-off

All arrays are ZYX, coordinates in voxels. numpy / scipy only.

Polarity: cryo-ET density may be dark (raw, negative contrast) or bright (inverted). The
template is cut from the same volume as the particles, so it carries their polarity and a
positive NCC peak marks a match either way; nothing needs flipping. (A template from another
source would need the sign checked: a polarity mismatch turns peaks into troughs.)

Optimism: ``best_f1_cutoff`` chooses the score threshold *with the ground truth* (an oracle),
so the F1 it reports is an upper bound on what this baseline reaches with a threshold fixed in
advance.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- template


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map integer indices onto [0, n) by mirror reflection without repeating the edge."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def prompt_template(volume: np.ndarray, prompts_zyx: np.ndarray, half_size: int) -> np.ndarray:
    """Average of the standardised boxes around the prompt points.

    Args:
        volume: (D, H, W) tomogram, ZYX.
        prompts_zyx: (N, 3) prompt centres in voxels, ZYX, float (rounded to the nearest voxel).
        half_size: box half-width h; each box is (2h+1)^3 voxels centred on the prompt.

    Boxes that cross the volume edge are filled by mirror reflection; a box entirely outside
    the volume, or constant, is skipped (logged). Each box is standardised (zero mean, unit
    std) before averaging, so prompts in brighter or noisier regions do not dominate.

    Returns:
        (2h+1, 2h+1, 2h+1) float32 template, ZYX.

    Raises:
        ValueError: volume not 3-D, prompts not (N, 3), half_size < 1, or no usable box.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got shape {volume.shape}")
    prompts = np.atleast_2d(np.asarray(prompts_zyx, dtype=np.float64))
    if prompts.ndim != 2 or prompts.shape[1] != 3 or len(prompts) == 0:
        raise ValueError(f"prompts_zyx must be (N, 3) with N >= 1, got shape {np.shape(prompts_zyx)}")
    if int(half_size) != half_size or half_size < 1:
        raise ValueError(f"half_size must be a positive integer, got {half_size!r}")
    h = int(half_size)
    offsets = np.arange(-h, h + 1)
    total = np.zeros((2 * h + 1,) * 3, dtype=np.float64)
    used = 0
    for centre in np.rint(prompts).astype(np.int64):
        if any(c + h < 0 or c - h >= n for c, n in zip(centre, volume.shape)):
            logger.warning("prompt %s: box entirely outside volume %s, skipped", centre.tolist(), volume.shape)
            continue
        index = [_reflect_index(c + offsets, n) for c, n in zip(centre, volume.shape)]
        box = volume[np.ix_(*index)].astype(np.float64)
        std = box.std()
        if not std > 0:
            logger.warning("prompt %s: constant box, skipped", centre.tolist())
            continue
        total += (box - box.mean()) / std
        used += 1
    if used == 0:
        raise ValueError(f"no usable prompt box among {len(prompts)} prompts in volume {volume.shape}")
    return (total / used).astype(np.float32)


# --------------------------------------------------------------------------- rotations


def rotations_24() -> list[np.ndarray]:
    """The 24 proper rotations of the cube (octahedral group), identity first.

    Returns:
        24 (3, 3) int64 matrices in ZYX axis order: signed permutation matrices of
        determinant +1. A matrix R maps a template offset v (ZYX, about the centre) to R @ v.
    """
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            mat = np.zeros((3, 3), dtype=np.int64)
            mat[np.arange(3), perm] = signs
            if round(np.linalg.det(mat)) == 1:
                out.append(mat)
    return out


def random_rotations(n_rotations: int, *, seed: int = 0) -> list[np.ndarray]:
    """``n_rotations`` rotations drawn uniformly from SO(3) (scipy Rotation), ZYX axis order.

    Pass the result as ``match_template(..., rotations=...)``; the template is then rotated
    by trilinear interpolation instead of exactly.

    Returns:
        n_rotations (3, 3) float64 matrices, determinant +1.
    """
    if n_rotations < 1:
        raise ValueError(f"n_rotations must be >= 1, got {n_rotations}")
    xyz = Rotation.random(n_rotations, random_state=seed).as_matrix()
    return [m[::-1, ::-1].copy() for m in xyz]  # conjugate by the axis reversal XYZ -> ZYX


def _as_signed_permutation(rotation: np.ndarray) -> np.ndarray | None:
    """The integer matrix if ``rotation`` is a signed permutation, else None."""
    rounded = np.rint(rotation)
    if np.allclose(rotation, rounded, atol=1e-6) and np.all(np.abs(rounded).sum(axis=0) == 1) \
            and np.all(np.abs(rounded).sum(axis=1) == 1):
        return rounded.astype(np.int64)
    return None


def rotate_template(template: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Rotate a cubic template about its centre voxel: output(R @ v) = input(v).

    Signed permutation matrices (the 24 cube rotations) are applied exactly with
    transpose + flip; any other rotation by trilinear interpolation.

    Args:
        template: (S, S, S) array, S odd, ZYX.
        rotation: (3, 3) rotation matrix in ZYX axis order.

    Returns:
        (S, S, S) array of the template's dtype (float32 for interpolated rotations).
    """
    rotation = np.asarray(rotation, dtype=np.float64)
    if rotation.shape != (3, 3):
        raise ValueError(f"rotation must be (3, 3), got shape {rotation.shape}")
    perm = _as_signed_permutation(rotation)
    if perm is not None:
        axes = np.argmax(np.abs(perm), axis=1)  # output axis i reads input axis axes[i]
        out = np.transpose(template, axes)
        flips = tuple(i for i in range(3) if perm[i, axes[i]] < 0)
        return np.flip(out, axis=flips).copy() if flips else out.copy()
    centre = (np.asarray(template.shape, dtype=np.float64) - 1) / 2
    inverse = rotation.T
    return ndimage.affine_transform(np.asarray(template, dtype=np.float32), inverse,
                                    offset=centre - inverse @ centre, order=1, mode="nearest")


# --------------------------------------------------------------------------- matching


def _spherical_mask(size: int, radius: float) -> np.ndarray:
    h = (size - 1) / 2
    grid = np.indices((size,) * 3, dtype=np.float64) - h
    return (grid ** 2).sum(axis=0) <= radius ** 2 + 1e-9


def match_template(volume: np.ndarray, template: np.ndarray, *,
                   rotations: Sequence[np.ndarray] | None = None,
                   mask_radius: float | None = None) -> np.ndarray:
    """Local normalised cross-correlation, maximised over rotations (Roseman's fast NCC).

    For each rotation the template is restricted to a spherical mask, made zero-mean and unit
    norm inside it, and correlated with the volume by FFT; the result is divided by the norm
    of the volume's zero-mean values under the mask at each position, computed from FFT
    correlations of the volume and its square with the mask (shared by all rotations, as the
    mask is a sphere). By Cauchy-Schwarz the score lies in [-1, 1]; it is 1 where the volume
    under the mask is an affine copy (positive scale) of the rotated template.

    Edge: the volume is standardised (global mean 0, std 1) and zero-padded, i.e. outside is
    filled with the volume's mean; every voxel gets a score, and windows that cross the edge
    are scored on the padded values (the fill counts in the local mean and std). Voxels whose
    window is constant score 0.

    Args:
        volume: (D, H, W) tomogram, ZYX.
        template: (S, S, S) template, S = 2h+1 odd, ZYX, e.g. from ``prompt_template``.
        rotations: (3, 3) ZYX rotation matrices; default ``rotations_24()`` (exact rotations).
            Use ``random_rotations(n, seed=...)`` for a uniform sample of SO(3).
        mask_radius: radius in voxels of the spherical mask; default h.

    Returns:
        (D, H, W) float32 NCC map in [-1, 1]; the value at a voxel scores a particle centred
        there (template centre voxel on that voxel).

    Raises:
        ValueError: volume not 3-D, template not an odd cube, mask radius not positive, or
            template constant inside the mask.
    """
    volume = np.asarray(volume)
    template = np.asarray(template, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got shape {volume.shape}")
    size = template.shape[0]
    if template.ndim != 3 or len(set(template.shape)) != 1 or size % 2 == 0:
        raise ValueError(f"template must be an odd cube (2h+1, 2h+1, 2h+1), got shape {template.shape}")
    h = size // 2
    radius = float(h if mask_radius is None else mask_radius)
    if not radius > 0:
        raise ValueError(f"mask_radius must be > 0, got {mask_radius!r}")
    rotations = rotations_24() if rotations is None else list(rotations)
    mask = _spherical_mask(size, radius)
    n_mask = int(mask.sum())

    shape = volume.shape
    padded = tuple(sfft.next_fast_len(max(n + h, size), real=(axis == 2)) for axis, n in enumerate(shape))
    crop = tuple(slice(0, n) for n in shape)
    # Template offsets -h..h land at indices (offset mod P): the template centre sits at index 0,
    # so correlation output index x is the score of a particle centred at x.
    place = np.ix_(*[np.arange(-h, h + 1) % p for p in padded])

    vol64 = volume.astype(np.float64)
    mean, std = vol64.mean(), vol64.std()
    if not std > 0:
        return np.zeros(shape, dtype=np.float32)
    buf64 = np.zeros(padded, dtype=np.float64)
    buf64[crop] = (vol64 - mean) / std
    del vol64

    # Local sums under the mask, float64 to keep sum(f^2) - sum(f)^2/N accurate.
    buf64_mask = np.zeros(padded, dtype=np.float64)
    buf64_mask[place] = mask
    mask_ft = np.conj(sfft.rfftn(buf64_mask, workers=-1))
    del buf64_mask
    vol_ft = sfft.rfftn(buf64, workers=-1)
    local_sum = sfft.irfftn(vol_ft * mask_ft, s=padded, workers=-1)[crop]
    buf64 **= 2
    local_sq = sfft.irfftn(sfft.rfftn(buf64, workers=-1) * mask_ft, s=padded, workers=-1)[crop]
    del buf64, mask_ft
    energy = local_sq - local_sum ** 2 / n_mask  # = n_mask * local variance
    inv_norm = np.zeros(shape, dtype=np.float32)
    ok = energy > 1e-8 * n_mask
    inv_norm[ok] = 1.0 / np.sqrt(energy[ok])
    del local_sum, local_sq, energy, ok
    vol_ft = vol_ft.astype(np.complex64)

    best = np.full(shape, -np.inf, dtype=np.float32)
    buf = np.zeros(padded, dtype=np.float32)
    for rotation in rotations:
        rotated = rotate_template(template, rotation).astype(np.float64)
        values = rotated[mask] - rotated[mask].mean()
        norm = np.linalg.norm(values)
        if not norm > 0:
            raise ValueError("template is constant inside the mask; nothing to correlate")
        rotated[:] = 0
        rotated[mask] = values / norm
        buf[place] = rotated
        corr = sfft.irfftn(vol_ft * np.conj(sfft.rfftn(buf, workers=-1)), s=padded, workers=-1)
        np.maximum(best, corr[crop], out=best)
    # The normaliser is positive and shared by all rotations, so it is applied once after the max.
    best *= inv_norm
    return np.clip(best, -1.0, 1.0, out=best)


# --------------------------------------------------------------------------- peaks


def pick_peaks(score_map: np.ndarray, *, radius: float, top_k: int | None = None,
               min_score: float = -np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of a score map with greedy 3-D non-maximum suppression, best first.

    Candidates are the voxels that equal the maximum of their cube neighbourhood of
    half-width max(1, floor(radius / sqrt(3))) (the cube inscribed in the suppression ball,
    so no maximum of the ball is lost) and score >= ``min_score``; they are then taken in
    decreasing score, each suppressing the candidates within ``radius`` voxels (cKDTree).

    Args:
        score_map: (D, H, W) scores, ZYX; NaN counts as -inf.
        radius: suppression radius in voxels (> 0).
        top_k: keep at most this many picks; default all.
        min_score: drop candidates scoring below this.

    Returns:
        zyx: (K, 3) float64 voxel coordinates, ZYX; scores: (K,) float64, non-increasing.
    """
    score_map = np.asarray(score_map)
    if score_map.ndim != 3:
        raise ValueError(f"score_map must be 3-D (D, H, W), got shape {score_map.shape}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    half = max(1, int(math.floor(radius / math.sqrt(3))))
    scores = np.where(np.isnan(score_map), -np.inf, score_map)
    local_max = ndimage.maximum_filter(scores, size=2 * half + 1, mode="nearest")
    candidate = (scores >= local_max) & np.isfinite(scores) & (scores >= min_score)
    points = np.argwhere(candidate).astype(np.float64)
    values = scores[candidate].astype(np.float64)
    order = np.argsort(-values, kind="stable")
    points, values = points[order], values[order]
    limit = len(points) if top_k is None else int(top_k)
    tree = cKDTree(points) if len(points) else None
    suppressed = np.zeros(len(points), dtype=bool)
    keep: list[int] = []
    for i in range(len(points)):
        if len(keep) >= limit:
            break
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[tree.query_ball_point(points[i], r=radius)] = True
    return points[keep].reshape(-1, 3), values[keep]


# --------------------------------------------------------------------------- oracle cut-off


class CutoffResult(NamedTuple):
    """Best score cut-off: keep picks with score >= threshold (+inf keeps none)."""

    threshold: float
    f1: float
    precision: float
    recall: float


def best_f1_cutoff(picks_zyx: np.ndarray, scores: np.ndarray, truth_zyx: np.ndarray,
                   truth_radius: float, radius_fraction: float = 0.5) -> CutoffResult:
    """Oracle score threshold maximising F1 against the ground truth.

    Picks are ranked by score (best first) and matched greedily in that order, each to the
    nearest still-unmatched true centre within ``radius_fraction * truth_radius`` voxels;
    because the matching of the top k picks is a prefix of the matching of the top k+1, one
    pass gives the true-positive count of every cut-off (O(K log K)). Cut-offs fall only
    between distinct scores. Ties in F1 go to the higher threshold.

    The threshold is chosen *with the truth*, so the result is optimistic: an upper bound on
    the F1 of this baseline with a threshold fixed beforehand.

    Args:
        picks_zyx: (K, 3) pick coordinates, ZYX voxels.
        scores: (K,) pick scores (higher is better), any order.
        truth_zyx: (T, 3) true centres, ZYX voxels.
        truth_radius: particle radius in voxels.
        radius_fraction: match distance as a fraction of ``truth_radius``.

    Returns:
        CutoffResult(threshold, f1, precision, recall); with no picks or no truth, f1 = 0 and
        threshold = +inf (0/0 ratios count as 0).
    """
    picks = np.asarray(picks_zyx, dtype=np.float64).reshape(-1, 3)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth_zyx, dtype=np.float64).reshape(-1, 3)
    if len(picks) != len(scores):
        raise ValueError(f"{len(picks)} picks but {len(scores)} scores")
    n_picks, n_truth = len(picks), len(truth)
    order = np.argsort(-scores, kind="stable")
    picks, scores = picks[order], scores[order]
    hit = np.zeros(n_picks, dtype=np.int64)
    if n_picks and n_truth:
        distance = radius_fraction * truth_radius
        tree = cKDTree(truth)
        matched = np.zeros(n_truth, dtype=bool)
        for i, point in enumerate(picks):
            near = tree.query_ball_point(point, r=distance)
            free = [j for j in near if not matched[j]]
            if free:
                j = min(free, key=lambda j: np.sum((truth[j] - point) ** 2))
                matched[j] = True
                hit[i] = 1
    tp = np.concatenate([[0], np.cumsum(hit)])  # tp[k]: true positives among the top k
    k = np.arange(n_picks + 1)
    valid = np.ones(n_picks + 1, dtype=bool)
    valid[1:-1] = scores[1:] < scores[:-1]  # cut after pick k only where the score drops
    denom = k + n_truth
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    f1[~valid] = -1.0
    best = int(np.argmax(f1))
    return CutoffResult(
        threshold=float(scores[best - 1]) if best > 0 else math.inf,
        f1=float(max(f1[best], 0.0)),
        precision=float(tp[best] / best) if best > 0 else 0.0,
        recall=float(tp[best] / n_truth) if n_truth else 0.0,
    )
