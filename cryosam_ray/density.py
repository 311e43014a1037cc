"""The density around particles at the prompts' scale: blob proposals and shell descriptors.

Weight-free and encoder-independent, so the decisions built on it hold for any encoder:

- **Blobs** (:meth:`DensityMap.peaks`): local maxima of the scale-normalised Laplacian of
  Gaussian at sigma = r / sqrt(3), the scale at which a solid ball of radius r responds most,
  in the prompts' polarity (dense is dark in raw reconstructions). ``r`` is the prompt
  instances' equivalent radius, so the detector is tuned by the prompts, never by a constant.
- **Shells** (:meth:`DensityMap.shells`): the mean and the spread of the density on S
  concentric shells out to ``reach`` radii around a point. Invariant to any 3D rotation of the
  particle, and shell radii are fractions of r, so the profile of a prompt describes its kind
  (a solid ball, a hollow barrel, an elongated dimer) at any voxel size.
- **Span and stretch** of a prompt (:class:`DensityProfile`): how far apart the strong blobs
  inside its mask lie (a filament's ends, a dimer's halves; 0 for a compact particle), and how
  far its mask is drawn out along z (the missing wedge): what one particle of the class can
  hold, so that a mask holding more is cut (:mod:`cryosam_ray.stages.stacks`).

A candidate's **density score** (:func:`density_scores`, :class:`DensityScorer`) adds two robust
z-scores over the candidate pool of its class and tomogram: how strongly it stands out at the
prompts' scale (blob contrast), and how close its shells are to the prompts' (each shell in
units of its spread over the pool). It needs no threshold fitted to one encoder or one dataset.
:func:`density_proposals` builds that pool per class (feature proposals plus blobs) and ranks it.

For particles of 12 voxels in radius or more the density is block-averaged first
(:func:`bin_factor`), so a descriptor costs about the same at any pixel size. Memory: one
float32 copy of the (binned) density per tomogram; filtered responses are computed by z slab,
once each, and kept in memory up to 256 MiB, beyond that in an unlinked scratch file
(:mod:`cryosam_ray.slab_filter`), so a tomogram of any size fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from cryosam_ray.matching import Proposals, nms
from cryosam_ray.slab_filter import SLAB_BYTES, SlabFiltered, reflect_index

if TYPE_CHECKING:  # the stages import this module
    from cryosam_ray.config import CryoSamConfig
    from cryosam_ray.particle import ClassQuery, Particle

_MAD_TO_STD = 1.4826


def bin_factor(radius: float) -> int:
    """Block size for particles of ``radius`` voxels: binned radius in [6, 12) (1 below 6)."""
    return max(1, int(radius // 6))


@dataclass
class DensityProfile:
    """What the density of one particle looks like at its own scale.

    Attributes:
        shells: (2S,) mean, then spread, of the standardised density on S shells out to ``reach``
            radii, in the particle's polarity (dense is positive).
        contrast: scale-normalised LoG response at the centre (positive: stands out).
        polarity: +1 where dense is bright in the file, -1 where dense is dark.
        span: the largest distance between the strong blob peaks inside the particle's mask
            (:func:`strong_peaks`), voxels: 0 for a compact particle, about its length for a
            filament or a dimer, which hold a blob at each end.
        stretch: the mask's spread along z over its spread across (standard deviations, at
            least 1): how far the missing wedge draws the particle out along z.
    """

    shells: np.ndarray
    contrast: float
    polarity: float
    span: float = 0.0
    stretch: float = 1.0


_STRONG = 0.5  # a blob peak inside a mask counts when it reaches this fraction of the mask's strongest


def strong_peaks(peaks: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (K, 3) ``peaks`` of one mask (and their (K,) ``response``) that reach half the
    strongest's response, strongest first: a particle's own blobs, not the noise on its rim."""
    order = np.argsort(-response, kind="stable")
    order = order[response[order] >= _STRONG * response.max()] if len(order) else order
    return peaks[order], response[order]


class DensityMap:
    """A tomogram's standardised density, block-averaged ``bin`` x ``bin`` x ``bin`` (see
    :func:`bin_factor`). Methods take coordinates and radii in voxels of the tomogram.

    Args:
        tomogram: the :class:`~cryosam_ray.tomo_io.Tomogram` (read whole, once).
        bin: block size.
    """

    def __init__(self, tomogram, bin: int = 1):
        self.bin = int(bin)
        self.data = _standardised(tomogram, self.bin)
        self._blobs: dict[tuple[float, float], SlabFiltered] = {}
        self._peaks: dict[tuple[float, float, int], tuple[np.ndarray, np.ndarray]] = {}

    def _to_binned(self, zyx: np.ndarray) -> np.ndarray:
        return (np.asarray(zyx, np.float64).reshape(-1, 3) + 0.5) / self.bin - 0.5

    def polarity(self, voxels: np.ndarray) -> float:
        """+1 if the (M, 3) ZYX voxels are brighter than average (dense is bright), else -1."""
        binned = np.clip(np.rint(self._to_binned(voxels)).astype(int), 0, np.asarray(self.data.shape) - 1)
        return 1.0 if float(self.data[tuple(binned.T)].mean()) >= 0 else -1.0

    def blob_response(self, radius: float, polarity: float) -> SlabFiltered:
        """Binned scale-normalised LoG at sigma = r / sqrt(3), positive on dense blobs, computed
        by slab when asked for (see :mod:`cryosam_ray.slab_filter`)."""
        key = (round(float(radius), 3), float(polarity))
        if key not in self._blobs:
            sigma = radius / self.bin / math.sqrt(3)
            scale = -polarity * sigma ** 2

            def log(block: np.ndarray) -> np.ndarray:
                return scale * ndimage.gaussian_laplace(block, sigma)

            self._blobs[key] = SlabFiltered(self.data, log, halo=int(4.0 * sigma + 0.5) + 1)  # scipy's truncate=4
        return self._blobs[key]

    def contrast(self, zyx: np.ndarray, radius: float, polarity: float) -> np.ndarray:
        """(N,) blob response at (N, 3) ZYX voxel coordinates (linear interpolation)."""
        return self.blob_response(radius, polarity).interpolate(self._to_binned(zyx))

    def peaks(self, radius: float, polarity: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` strongest blobs at least a radius apart: ((K, 3) ZYX voxels, (K,) response);
        found once per scale and kept (the search and the stack splitting both ask)."""
        key = (round(float(radius), 3), float(polarity), int(top_k))
        if key not in self._peaks:
            r = radius / self.bin
            peaks, values = self.blob_response(radius, polarity).local_maxima(max(3, int(round(r)) | 1))
            keep = nms(peaks.astype(np.float64), values, radius=r, top_k=top_k)
            self._peaks[key] = ((peaks[keep] + 0.5) * self.bin - 0.5, values[keep])
        return self._peaks[key]

    def peaks_in(self, voxels: np.ndarray, radius: float, polarity: float) -> tuple[np.ndarray, np.ndarray]:
        """The blobs (as :meth:`peaks`, all of them) at the (M, 3) ZYX ``voxels`` of a mask: ((K, 3)
        ZYX voxels, (K,) response), from the LoG of the region around the mask only."""
        r = radius / self.bin
        sigma = r / math.sqrt(3)
        binned = np.rint(self._to_binned(voxels)).astype(np.int64)
        halo = int(4.0 * sigma + 0.5) + 1
        lo = np.maximum(binned.min(axis=0) - halo, 0)
        hi = np.minimum(binned.max(axis=0) + halo + 1, self.data.shape)
        block = self.data[tuple(slice(a, b) for a, b in zip(lo, hi))]
        response = -polarity * sigma ** 2 * ndimage.gaussian_laplace(block, sigma)
        found = (response == ndimage.maximum_filter(response, size=max(3, int(round(r)) | 1))) & (response > 0)
        inside = np.zeros(block.shape, bool)
        inside[tuple((binned - lo).T)] = True
        points = np.argwhere(found & inside)
        values = response[tuple(points.T)]
        keep = nms(points.astype(np.float64), values, radius=r, top_k=len(points))
        return (points[keep] + lo + 0.5) * self.bin - 0.5, values[keep]

    def shells(self, zyx: np.ndarray, radius: float, polarity: float, *, count: int = 8,
               reach: float = 2.0) -> np.ndarray:
        """(N, 2 * count) shell profiles around (N, 3) ZYX voxel coordinates (see module docstring),
        each centred on the nearest voxel of the (binned) density."""
        r = radius / self.bin
        half = int(math.ceil(reach * r))
        offsets = np.mgrid[-half:half + 1, -half:half + 1, -half:half + 1].reshape(3, -1).T
        shell = (np.linalg.norm(offsets, axis=1) / (reach * r) * count).astype(int)
        inside = shell < count
        offsets, shell = offsets[inside], shell[inside]
        average = np.zeros((len(shell), count), np.float32)
        average[np.arange(len(shell)), shell] = 1.0
        average /= np.maximum(average.sum(axis=0), 1)
        base = np.clip(np.rint(self._to_binned(zyx)).astype(int), 0, np.asarray(self.data.shape) - 1)
        out = np.zeros((len(base), 2 * count), np.float32)
        chunk = max(1, 2**20 // len(offsets))  # points per pass: about a million gathered voxels
        for start in range(0, len(base), chunk):
            index = base[start:start + chunk, None, :] + offsets[None]  # mirrored at the edges, as np.pad's reflect
            z, y, x = (reflect_index(index[..., a], n) for a, n in enumerate(self.data.shape))
            values = self.data[z, y, x] * np.float32(polarity)  # (n, V)
            mean = values @ average
            out[start:start + chunk, :count] = mean
            out[start:start + chunk, count:] = np.sqrt(np.maximum((values * values) @ average - mean * mean, 0))
        return out

    def refine(self, zyx: np.ndarray, radius: float, polarity: float, within: float) -> np.ndarray:
        """(N, 3) ZYX voxel positions of the blob peaks nearest (N, 3) points, to a sub-voxel.

        From each point's voxel (binned), step to the strongest of its 26 neighbours while that
        is stronger and no further than ``within`` voxels from the point, then fit a parabola
        through the peak and its two neighbours on each axis (an offset of at most half a voxel):
        the position a particle's density is centred on, which the voxel grid and the mask's
        outline (merged with a neighbour, or cut short by the missing wedge) only approximate.
        """
        response = self.blob_response(radius, polarity)
        start = self._to_binned(zyx)
        shape = np.asarray(response.shape)
        at = np.clip(np.rint(start).astype(np.int64), 0, shape - 1)
        steps = np.array(list(np.ndindex(3, 3, 3))) - 1
        reach = max(within / self.bin, 1.0)
        for _ in range(int(math.ceil(reach)) + 1):
            around = np.clip(at[:, None] + steps[None], 0, shape - 1)  # (N, 27, 3)
            values = response.values(around.reshape(-1, 3)).reshape(len(at), len(steps))
            values[np.linalg.norm(around - start[:, None], axis=2) > reach] = -np.inf
            best = around[np.arange(len(at)), np.argmax(values, axis=1)]
            if np.array_equal(best, at):
                break
            at = best
        offset = np.zeros(at.shape, np.float64)
        centre = response.values(at).astype(np.float64)
        for axis in range(3):
            unit = np.eye(3, dtype=np.int64)[axis]
            below = response.values(np.clip(at - unit, 0, shape - 1)).astype(np.float64)
            above = response.values(np.clip(at + unit, 0, shape - 1)).astype(np.float64)
            curvature = below - 2 * centre + above
            peaked = (curvature < 0) & (at[:, axis] > 0) & (at[:, axis] < shape[axis] - 1)
            offset[peaked, axis] = np.clip(0.5 * (below - above)[peaked] / curvature[peaked], -0.5, 0.5)
        return (at + offset + 0.5) * self.bin - 0.5

    def strongest_near(self, zyx: np.ndarray, radius: float, polarity: float, within: float) -> np.ndarray:
        """(3,) ZYX voxel of the strongest blob response within ``within`` voxels of ``zyx``."""
        response = self.blob_response(radius, polarity)
        centre = self._to_binned(zyx)[0]
        reach = max(1, int(math.ceil(within / self.bin)))
        lo = np.maximum(np.rint(centre).astype(int) - reach, 0)
        hi = np.minimum(np.rint(centre).astype(int) + reach + 1, response.shape)
        grid = np.argwhere(np.ones(hi - lo, bool)) + lo
        grid = grid[np.linalg.norm(grid - centre, axis=1) <= within / self.bin]
        best = grid[np.argmax(response.values(grid))] if len(grid) else np.rint(centre).astype(int)
        return (best + 0.5) * self.bin - 0.5

    def profile(self, click: np.ndarray, voxels: np.ndarray, radius: float, *, count: int = 8,
                reach: float = 2.0) -> DensityProfile:
        """The :class:`DensityProfile` of a prompted particle from the click (3,) ZYX, its mask's
        (M, 3) voxels and radius: at the strongest blob within half a radius of the click (where
        a candidate of the same kind would be found), with the ``span`` of its strong blobs
        and its mask's ``stretch``."""
        click = np.asarray(click, np.float64)
        polarity = self.polarity(voxels)
        centre = self.strongest_near(click, radius, polarity, 0.5 * radius)
        blobs = strong_peaks(*self.peaks_in(voxels, radius, polarity))[0]
        span = max((float(np.linalg.norm(a - b)) for a in blobs for b in blobs), default=0.0)
        return DensityProfile(self.shells(centre[None], radius, polarity, count=count, reach=reach)[0],
                              float(self.contrast(centre[None], radius, polarity)[0]), polarity, span,
                              z_stretch(voxels))


def z_stretch(voxels: np.ndarray) -> float:
    """A mask's spread along z over its spread across, from its (M, 3) ZYX voxels (standard
    deviations; at least 1)."""
    spread = np.asarray(voxels, np.float64).std(axis=0)
    across = math.sqrt(0.5 * (spread[1] ** 2 + spread[2] ** 2))
    return max(1.0, float(spread[0] / across)) if across > 0 else 1.0


def _standardised(tomogram, bin: int) -> np.ndarray:
    """(D/bin, H/bin, W/bin) float32: the tomogram normalised (its robust statistics),
    block-averaged, then standardised to mean 0, std 1; read slab by slab, so the one
    whole-size array is the result."""
    d, h, w = (s // bin * bin for s in tomogram.shape)
    data = np.empty((d // bin, h // bin, w // bin), np.float32)
    step = max(bin, SLAB_BYTES // max(1, h * w * 4) // bin * bin)
    for z0 in range(0, d, step):
        block = tomogram.normalize(tomogram.slab(0, z0, min(d, z0 + step)))[:, :h, :w]
        if bin > 1:
            block = block.reshape(-1, bin, h // bin, bin, w // bin, bin).mean(axis=(1, 3, 5))
        data[z0 // bin:z0 // bin + len(block)] = block
    chunks = [data[i:i + max(1, step // bin)] for i in range(0, len(data), max(1, step // bin))]
    mean = sum(float(c.sum(dtype=np.float64)) for c in chunks) / max(data.size, 1)
    var = sum(float(np.square(c - np.float32(mean), dtype=np.float64).sum()) for c in chunks) / max(data.size, 1)
    std = np.float32(max(math.sqrt(var), 1e-6))
    for c in chunks:  # views: in place
        c -= np.float32(mean)
        c /= std
    return data


def robust_z(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(values - median) / (1.4826 MAD) with the median and MAD of ``reference`` (default: values)."""
    centre, spread = _robust_centre_spread(np.asarray(values if reference is None else reference, np.float64))
    return (np.asarray(values, np.float64) - centre) / spread


def _robust_centre_spread(values: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(values))
    spread = _MAD_TO_STD * float(np.median(np.abs(values - centre)))
    return centre, spread if spread > 0 else (float(values.std()) or 1.0)


@dataclass
class PoolStatistics:
    """What a density score is measured against: the spread of each shell value and the centre
    and spread of the contrast and of the shell distance over a candidate pool."""

    shell_spread: np.ndarray  # (2S,)
    contrast: tuple[float, float]
    distance: tuple[float, float]

    @classmethod
    def fit(cls, shells: np.ndarray, contrast: np.ndarray, query_shells: np.ndarray) -> "PoolStatistics":
        spread = _MAD_TO_STD * np.median(np.abs(shells - np.median(shells, axis=0)), axis=0)
        spread = np.maximum(spread, 1e-3 * max(float(spread.max()), 1e-6))
        distance = np.sqrt(np.mean(((shells - query_shells) / spread) ** 2, axis=1))
        return cls(spread, _robust_centre_spread(np.asarray(contrast, np.float64)), _robust_centre_spread(distance))

    def apply(self, shells: np.ndarray, contrast: np.ndarray, query_shells: np.ndarray):
        """(N,) score = z(contrast) + z(-shell distance), and (N,) minus the shell distance."""
        distance = np.sqrt(np.mean(((shells - query_shells) / self.shell_spread) ** 2, axis=1))
        score = ((np.asarray(contrast, np.float64) - self.contrast[0]) / self.contrast[1]
                 + (self.distance[0] - distance) / self.distance[1])
        return score, -distance


def density_scores(shells: np.ndarray, contrast: np.ndarray, query_shells: np.ndarray, *,
                   pool: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Density scores of candidates against a class's prompts.

    Args:
        shells: (N, 2S) candidate shell profiles; contrast: (N,) their blob responses.
        query_shells: (2S,) the prompts' mean profile.
        pool: which candidates define the statistics (the rest, e.g. prompts, are scored alike).

    Returns:
        (N,) score = z(contrast) + z(-shell distance), and (N,) the shell distance itself, negated
        (RMS over shells, each in units of its spread over the pool): what compares classes (a
        stronger particle of another kind has the contrast, not the shape).
    """
    stats = PoolStatistics.fit(shells[pool], contrast[pool], query_shells)
    return stats.apply(shells, contrast, query_shells)


@dataclass
class DensityScorer:
    """Density scores of points against one class's prompts on one tomogram, with the statistics
    of that class's candidate pool there (:meth:`fit` first)."""

    dmap: DensityMap
    query_shells: np.ndarray
    radius: float
    polarity: float
    count: int = 8
    reach: float = 2.0
    statistics: PoolStatistics | None = None

    def _measure(self, zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zyx = np.asarray(zyx, np.float64).reshape(-1, 3)
        return (self.dmap.shells(zyx, self.radius, self.polarity, count=self.count, reach=self.reach),
                self.dmap.contrast(zyx, self.radius, self.polarity))

    def fit(self, pool_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fit the statistics on (N, 3) ZYX candidates; returns their (score, -distance)."""
        shells, contrast = self._measure(pool_zyx)
        self.statistics = PoolStatistics.fit(shells, contrast, self.query_shells)
        return self.statistics.apply(shells, contrast, self.query_shells)

    def score(self, zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, -shell distance) of (N, 3) ZYX points, each (N,)."""
        if not len(zyx):
            return np.zeros(0), np.zeros(0)
        return self.statistics.apply(*self._measure(zyx), self.query_shells)


def density_map(maps: dict[int, DensityMap], tomogram, radius: float) -> DensityMap:
    """The tomogram's :class:`DensityMap` at the binning for ``radius``, built once per binning
    (reading and normalising the whole tomogram) and kept in ``maps``."""
    bin = bin_factor(radius)
    if bin not in maps:
        maps[bin] = DensityMap(tomogram, bin)
    return maps[bin]


def density_proposals(tomogram, queries: dict[str, ClassQuery], proposals: dict[str, Proposals],
                      prompts: list[Particle], cfg: CryoSamConfig, maps: dict[int, DensityMap] | None = None):
    """Each class's proposals with blobs at its scale added (``density.blobs``) and, with
    ``density.score: density``, ranked by density score.

    The pool is the feature-matching proposals and, with blobs, the ``density.pool`` strongest
    blobs at the class's scale; all are scored against the pool's statistics, near-duplicates
    (within the class radius) keep the best, and the best ``matching.top_k`` are kept, their
    scores as ``similarity``. This tomogram's prompts
    get their score (at the click) as ``score``. With the features score, blob and feature
    proposals alternate, each best first.

    ``maps``: the tomogram's density maps by binning, shared with the caller's later uses (one
    copy of the density per binning); a new dict when None.

    Returns:
        (class -> :class:`Proposals`, class -> its fitted :class:`DensityScorer`; empty with the
        features score).
    """
    d = cfg.density
    maps = {} if maps is None else maps
    out, scorers = {}, {}
    for cls in sorted(queries):
        query, found = queries[cls], proposals[cls]
        if query.shells is None:  # no prompt profile (should not happen when density is on)
            out[cls] = found
            continue
        radius = query.radius
        dmap = density_map(maps, tomogram, radius)
        if d.score != "density":
            blobs, strength = dmap.peaks(radius, query.polarity, cfg.matching.top_k)
            out[cls] = _alternate(found, Proposals(blobs, strength.astype(np.float32), len(strength)),
                                  cfg.matching.top_k)
            continue
        pool = [np.asarray(found.zyx, np.float64).reshape(-1, 3)]
        if d.blobs:
            pool.append(dmap.peaks(radius, query.polarity, d.pool)[0])
        zyx = np.concatenate(pool)
        if not len(zyx):
            out[cls] = found
            continue
        scorer = scorers[cls] = DensityScorer(dmap, query.shells, radius, query.polarity, d.shells, d.reach)
        scores, _ = scorer.fit(zyx)
        keep = nms(zyx, scores, radius=radius, top_k=cfg.matching.top_k)
        out[cls] = Proposals(zyx[keep], scores[keep].astype(np.float32), found.evaluated)
        mine = [p for p in prompts if p.cls == cls]
        for particle, score in zip(mine, scorer.score(np.array([p.instance.prompt for p in mine]))[0]):
            particle.score = float(score)
    return out, scorers


def _alternate(first: Proposals, second: Proposals, top_k: int) -> Proposals:
    """Proposals taken alternately from two lists, best first each, at most ``top_k``."""
    order = sorted([(2 * i, 0, i) for i in range(len(first))] + [(2 * i + 1, 1, i) for i in range(len(second))])
    sources = (first, second)
    zyx = np.array([sources[s].zyx[i] for _, s, i in order[:top_k]]).reshape(-1, 3)
    sims = np.array([sources[s].similarity[i] for _, s, i in order[:top_k]], np.float32)
    return Proposals(zyx, sims, first.evaluated + second.evaluated)
