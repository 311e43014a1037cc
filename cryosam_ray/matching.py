"""Query features and Hierarchical Feature Matching (paper, section 2.3).

The query of a class is the masked average of voxel features over its prompt instances.
Matching scores voxels against the query, coarse to fine: every cell of the coarsest grid
(ratio 16), then only the children of cells kept at the next ratio, and so on; at the last
ratio, 3D non-maximum suppression and the top K.

Two scores (``similarity``):

- ``cosine`` (the paper): cos(f, q). Blind to magnitude: a flat, featureless region whose
  weak features happen to point like the query scores as high as a particle.
- ``projection`` (the default): ``(f - m) . (q - b) / |q - b|^2``, the voxel's feature projected
  on the query's direction away from the background, in units of the query. ``b`` is the mean
  feature of the tomograms the prompts lie in, ``m`` the mean feature of the tomogram matched,
  so a query serves other tomograms, with other contrast, as well. A prompt scores about 1,
  background about 0, for any encoder: thresholds become fractions of the prompt's own score.

Speed: bilinear sampling is linear, so ``q . f(v)`` is the bilinear interpolation of per-token
dot products, and ``|f(v)|^2`` is a quadratic form of the four surrounding tokens whose ten
pairwise products are query-independent. :class:`SimilarityField` precomputes those at token
resolution once, after which the exact cosine at any voxel costs a few dozen flops instead of
touching 3C channels. :func:`naive_match` computes the same similarity the slow way (explicit
voxel features, every voxel) for comparison.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from cryosam_ray.features import FeatureVolume, bilinear_corners

log = logging.getLogger(__name__)


@dataclass
class Proposals:
    """Matched points of one query on one tomogram, best first.

    Attributes:
        zyx: (K, 3) float voxel coordinates.
        similarity: (K,) cosine similarity with the query (or the density score, once ranked by it).
        evaluated: voxels (or cells) scored, over all levels: the work done.
    """

    zyx: np.ndarray
    similarity: np.ndarray
    evaluated: int = 0

    def __len__(self) -> int:
        return len(self.similarity)


def query_feature(volume: FeatureVolume, instance_voxels: list[np.ndarray]) -> np.ndarray:
    """Masked average pooling: the mean voxel feature over all voxels of all prompt instances.

    Args:
        instance_voxels: per instance, (M_i, 3) ZYX voxel coordinates of its mask.

    Returns:
        (3C,) float32 query; raises ValueError when every instance is empty.
    """
    voxels = [np.asarray(v).reshape(-1, 3) for v in instance_voxels if len(v)]
    if not voxels:
        raise ValueError("no prompt instance has any voxel: nothing to build a query from")
    total = np.zeros(3 * volume.channels, np.float64)
    count = 0
    for chunk in np.array_split(np.concatenate(voxels), max(1, sum(len(v) for v in voxels) // 65536 + 1)):
        total += volume.sample(chunk).sum(axis=0, dtype=np.float64)
        count += len(chunk)
    return (total / count).astype(np.float32)


class _AxisField:
    """Token-level dot products and neighbour Gram maps of one axis (for one or more queries)."""

    def __init__(self, axis_maps, queries: np.ndarray, shard: int = 32, *, gram: bool = True):
        n, h, w, _ = axis_maps.maps.shape
        self.axis, self.slice_shape, self.grid = axis_maps.axis, axis_maps.slice_shape, (h, w)
        self.dot = np.zeros((len(queries), n, h, w), np.float32)
        # |t|^2, right, down, diagonal, anti-diagonal (norms: cosine only; a projection is linear)
        self.gram = np.zeros((5, n, h, w) if gram else (5, 0, 0, 0), np.float32)
        for start in range(0, n, shard):
            m = np.asarray(axis_maps.maps[start:start + shard], dtype=np.float32)
            self.dot[:, start:start + len(m)] = np.einsum("nhwc,qc->qnhw", m, queries)
            if not gram:
                continue
            g = self.gram[:, start:start + len(m)]
            g[0] = np.einsum("nhwc,nhwc->nhw", m, m)
            g[1, :, :, :-1] = np.einsum("nhwc,nhwc->nhw", m[:, :, :-1], m[:, :, 1:])
            g[2, :, :-1] = np.einsum("nhwc,nhwc->nhw", m[:, :-1], m[:, 1:])
            g[3, :, :-1, :-1] = np.einsum("nhwc,nhwc->nhw", m[:, :-1, :-1], m[:, 1:, 1:])
            g[4, :, :-1, :-1] = np.einsum("nhwc,nhwc->nhw", m[:, :-1, 1:], m[:, 1:, :-1])

    def terms(self, zyx: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
        """((Q, N) interpolated dot products, (N,) squared norms of the interpolated features)."""
        index, ((r0, c0), _, (r1, _), (_, c1)), (w00, w01, w10, w11) = bilinear_corners(
            zyx, self.axis, self.slice_shape, self.grid, shape)
        dot = (w00 * self.dot[:, index, r0, c0] + w01 * self.dot[:, index, r0, c1]
               + w10 * self.dot[:, index, r1, c0] + w11 * self.dot[:, index, r1, c1])
        g = self.gram
        if not g.size:
            return dot, np.zeros(len(index))
        # A grid side of one token gives r1 == r0 (or c1 == c0) with zero weight on the second
        # corner, so the products that were never computed there are multiplied by zero.
        norm2 = (w00 ** 2 * g[0, index, r0, c0] + w01 ** 2 * g[0, index, r0, c1] + w10 ** 2 * g[0, index, r1, c0]
                 + w11 ** 2 * g[0, index, r1, c1]
                 + 2 * (w00 * w01 * g[1, index, r0, c0] + w10 * w11 * g[1, index, r1, c0]
                        + w00 * w10 * g[2, index, r0, c0] + w01 * w11 * g[2, index, r0, c1]
                        + w00 * w11 * g[3, index, r0, c0] + w01 * w10 * g[4, index, r0, c0]))
        return dot, norm2


SIMILARITIES = ("cosine", "projection")


class SimilarityField:
    """Exact similarity of queries with voxel features, anywhere, from token-level terms.

    Args:
        volume: the tomogram's :class:`FeatureVolume`.
        queries: (Q, 3C) query features (one per class).
        similarity: "cosine" (the paper) or "projection" (see the module docstring).
        backgrounds: (Q, 3C) the background ``b`` each query is measured from (projection only;
            None: this tomogram's mean feature, as for a query built on it).
    """

    def __init__(self, volume: FeatureVolume, queries: np.ndarray, *, similarity: str = "cosine",
                 backgrounds: np.ndarray | None = None):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        self.similarity = similarity
        self.offset = np.zeros(len(queries))
        self.scale = np.ones(len(queries))
        if similarity == "projection":
            mean = volume.mean_feature()
            backgrounds = mean[None] if backgrounds is None else np.atleast_2d(backgrounds)
            queries = queries - backgrounds  # the direction from background to the query
            self.scale = np.maximum(np.einsum("qc,qc->q", queries, queries), 1e-12)
            self.offset = queries @ mean
        queries = queries.astype(np.float32)
        c = volume.channels
        self.shape = volume.shape
        self.fields = [_AxisField(ax, queries[:, a * c:(a + 1) * c], gram=similarity == "cosine")
                       for a, ax in enumerate(volume.axes)]
        self.query_norm = np.linalg.norm(queries, axis=1)

    def score(self, zyx: np.ndarray) -> np.ndarray:
        """(Q, N) similarity at (N, 3) ZYX voxel coordinates."""
        zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
        dot = np.zeros((len(self.query_norm), len(zyx)), np.float64)
        norm2 = np.zeros(len(zyx), np.float64)
        for field in self.fields:
            d, n2 = field.terms(zyx, self.shape)
            dot += d
            norm2 += n2
        if self.similarity == "projection":
            return ((dot - self.offset[:, None]) / self.scale[:, None]).astype(np.float32)
        return (dot / (self.query_norm[:, None] * np.sqrt(np.maximum(norm2, 1e-12)))).astype(np.float32)

    cosine = score  # the paper's name, for cosine fields


def _cell_centres(cells: np.ndarray, ratio: int) -> np.ndarray:
    return (cells + 0.5) * ratio - 0.5


def auto_ratios(radius: float, levels: int = 3) -> tuple[int, ...]:
    """Pyramid ratios for particles of ``radius`` voxels, coarse to fine: the finest cell is the
    largest power of two <= radius / 2 (a pick lands within half a radius of the centre), each
    level twice as coarse as the next. 16/8/4 (the paper's) for a radius of 8-16 voxels."""
    finest = 2 ** max(0, int(np.floor(np.log2(max(radius, 1.0) / 2))))
    return tuple(finest * 2 ** k for k in reversed(range(levels)))


def hierarchical_match(field: SimilarityField, *, query: int = 0, ratios=(16, 8, 4), tau_sim: float | None = 0.5,
                       keep_fraction: float = 0.25, dilate: int = 1, nms_radius: float = 8.0, top_k: int = 512,
                       chunk: int = 1 << 18) -> Proposals:
    """Coarse-to-fine matching of one query (paper, section 2.3).

    Args:
        field: similarity terms of the tomogram and its queries.
        query: which query of ``field``.
        ratios: downsampling ratios, coarse to fine (each a multiple of the next).
        tau_sim: cells scoring below this are dropped at every level (the paper). None: calibrated
            from the scores instead: each coarser level keeps its best ``keep_fraction`` of cells,
            and the last level keeps every cell (NMS and ``top_k`` bound the proposals).
        dilate: cells of margin added around kept cells when moving to a finer level (recall
            at the edge of a coarse cell).
        nms_radius: 3D non-maximum suppression radius in voxels at the last level.
        top_k: at most this many proposals.
    """
    ratios = [int(r) for r in ratios]
    if any(a % b for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"each ratio must be a multiple of the next, got {ratios}")
    shape = np.asarray(field.shape)
    grid = np.ceil(shape / ratios[0]).astype(int)
    cells = np.argwhere(np.ones(grid, bool))
    evaluated = 0
    for level, ratio in enumerate(ratios):
        centres = np.minimum(_cell_centres(cells, ratio), shape - 1)
        sims = np.concatenate([field.score(c)[query] for c in np.array_split(centres, len(centres) // chunk + 1)]) \
            if len(cells) else np.zeros(0, np.float32)
        evaluated += len(cells)
        if tau_sim is not None:
            keep = sims >= tau_sim
        elif level + 1 < len(ratios) and len(sims):
            keep = sims >= np.quantile(sims, 1 - keep_fraction)
        else:
            keep = np.ones(len(sims), bool)
        cells, sims = cells[keep], sims[keep]
        if level + 1 < len(ratios):
            cells = _refine(cells, ratio // ratios[level + 1], dilate, np.ceil(shape / ratios[level + 1]).astype(int))
    centres = np.minimum(_cell_centres(cells, ratios[-1]), shape - 1)
    picked = nms(centres, sims, radius=nms_radius, top_k=top_k)
    return Proposals(zyx=centres[picked], similarity=sims[picked], evaluated=evaluated)


def _refine(cells: np.ndarray, factor: int, dilate: int, grid: np.ndarray) -> np.ndarray:
    """Children (at ``factor`` times the resolution) of kept cells, dilated, inside ``grid``."""
    if not len(cells):
        return cells
    keep = np.zeros(grid, bool)
    offsets = np.argwhere(np.ones((factor,) * 3, bool))
    children = (cells[:, None, :] * factor + offsets[None]).reshape(-1, 3)
    children = children[np.all(children < grid, axis=1)]
    keep[tuple(children.T)] = True
    if dilate:
        from scipy.ndimage import binary_dilation

        keep = binary_dilation(keep, iterations=dilate)
    return np.argwhere(keep)


def naive_match(volume: FeatureVolume, query_vec: np.ndarray, *, tau_sim: float | None = 0.5,
                nms_radius: float = 8.0, top_k: int = 512, similarity: str = "cosine",
                background: np.ndarray | None = None, max_bytes: int = 256 << 20) -> Proposals:
    """Full-resolution matching: explicit voxel features and the similarity at every voxel.

    Memory stays bounded: voxel features are built ``max_bytes`` at a time, never the whole
    D x H x W x 3C volume. ``similarity`` and ``background`` as for :class:`SimilarityField`;
    ``tau_sim`` None keeps every voxel (NMS and ``top_k`` bound the proposals).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    mean = volume.mean_feature() if similarity == "projection" else None
    volume = volume.load()
    q = np.asarray(query_vec, np.float64)
    if similarity == "projection":
        q = q - (mean if background is None else np.asarray(background, np.float64))
        offset, q = float(q @ mean) / float(q @ q), (q / float(q @ q)).astype(np.float32)
    else:
        q = (q / np.linalg.norm(q)).astype(np.float32)
    d, h, w = volume.shape
    per_chunk = max(1, max_bytes // (3 * volume.channels * 4 * h * w))
    sims = np.zeros(volume.shape, np.float32)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for z0 in range(0, d, per_chunk):
        z1 = min(d, z0 + per_chunk)
        zz = np.repeat(np.arange(z0, z1), h * w)
        zyx = np.stack([zz, np.tile(yy.ravel(), z1 - z0), np.tile(xx.ravel(), z1 - z0)], axis=1)
        feats = volume.sample(zyx)
        if similarity == "projection":
            sims[z0:z1] = (feats @ q - offset).reshape(z1 - z0, h, w)
        else:
            sims[z0:z1] = ((feats @ q) / np.maximum(np.linalg.norm(feats, axis=1), 1e-12)).reshape(z1 - z0, h, w)
    above = np.argwhere(sims >= tau_sim) if tau_sim is not None else np.argwhere(np.ones(sims.shape, bool))
    peaks, peak_sims = above.astype(np.float64), sims[tuple(above.T)]
    picked = nms(peaks, peak_sims, radius=nms_radius, top_k=top_k)
    return Proposals(zyx=peaks[picked], similarity=peak_sims[picked], evaluated=int(sims.size))


def nms(points: np.ndarray, scores: np.ndarray, *, radius: float, top_k: int) -> np.ndarray:
    """Greedy 3D non-maximum suppression: indices of kept points, best first, at most ``top_k``.

    A point is kept unless a better-scoring kept point lies within ``radius`` voxels.
    """
    if not len(points):
        return np.zeros(0, np.int64)
    order = np.argsort(-scores, kind="stable")
    tree = cKDTree(points)
    suppressed = np.zeros(len(points), bool)
    kept = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) >= top_k:
            break
        suppressed[tree.query_ball_point(points[i], radius)] = True
    return np.asarray(kept, np.int64)
