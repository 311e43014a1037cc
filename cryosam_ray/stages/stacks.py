"""Particles and blobs: masks that hold several particles are cut into one piece per particle;
a particle that holds several blobs is centred between them.

A threshold-and-connect mask (and SAM's, slice by slice) follows density from one slice into
the next; particles stacked along the beam are blurred into one column by the missing wedge,
and the column comes out as one mask, two or three particles tall. The class's blobs (the
scale-normalised LoG at the prompts' radius, :meth:`~cryosam_ray.density.DensityMap.peaks`)
still peak once per particle inside it. A mask whose strong blob peaks lie further apart along
z than one particle reaches is cut between them, each voxel to its nearest peak; each piece is
a candidate of its own, prompted at its peak. One particle reaches a diameter plus the span of
the blobs inside the prompts' own masks (0 for a compact particle, about the length of a
filament or a dimer, which hold a blob at each end), with z shrunk by the prompts' stretch
along z (one particle drawn out by the missing wedge may peak twice along z). Peaks side by
side within a slice are left alone: touching neighbours there are the 2D segmenter's to cut.

Where the class's prompts hold several blobs, its particles' centres lie between their blobs,
not on one of them (:func:`place_between_blobs`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cryosam_ray.density import strong_peaks
from cryosam_ray.particle import ClassQuery, Particle
from cryosam_ray.propagation import Instance


def blob_peaks_in(inst: Instance, peaks: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (K, 3) ZYX ``peaks`` (and their (K,) ``response``) that lie inside ``inst``'s mask."""
    z0, y0, x0, z1, y1, x1 = inst.bbox
    at = np.rint(peaks).astype(np.int64) - np.array([z0, y0, x0])
    inside = np.all((at >= 0) & (at < np.array([z1 - z0, y1 - y0, x1 - x0])), axis=1)
    inside[inside] = inst.mask[tuple(at[inside].T)]
    return peaks[inside], response[inside]


def particle_peaks(peaks: np.ndarray, response: np.ndarray, query: ClassQuery) -> np.ndarray:
    """(P, 3) ZYX: one peak per particle among a mask's (K, 3) ``peaks``: the strong ones
    (:func:`~cryosam_ray.density.strong_peaks`), strongest first, each stacked along z further
    than a particle of ``query``'s class reaches (2 radii plus its ``blob_span``, z shrunk by
    its ``z_stretch``) from every one kept before."""
    reach = 2 * query.radius + query.blob_span
    kept: list[np.ndarray] = []
    for peak in strong_peaks(peaks, response)[0]:
        if all(_stacked(peak - other, reach, query.z_stretch) for other in kept):
            kept.append(peak)
    return np.array(kept, np.float64).reshape(-1, 3)


def split_stack(inst: Instance, peaks: np.ndarray, response: np.ndarray, query: ClassQuery) -> list[Instance]:
    """``inst`` cut into one piece per particle peak inside it (see the module docstring), each
    piece's ``prompt`` its peak, strongest first; ``[inst]`` when it holds one particle.
    ``peaks``, ``response``: the class's blob peaks on the tomogram, (K, 3) ZYX and (K,)."""
    centres = particle_peaks(*blob_peaks_in(inst, peaks, response), query)
    if len(centres) < 2:
        return [inst]
    origin = np.array(inst.bbox[:3])
    voxels = np.argwhere(inst.mask)
    nearest = np.argmin(((voxels[:, None, :] - (centres - origin)[None]) ** 2).sum(axis=2), axis=1)
    pieces = []
    for k, centre in enumerate(centres):
        own = voxels[nearest == k]
        lo, hi = own.min(axis=0), own.max(axis=0) + 1
        mask = np.zeros(tuple(hi - lo), bool)
        mask[tuple((own - lo).T)] = True
        bbox = tuple(int(v) for v in (*(origin + lo), *(origin + hi)))
        pieces.append(replace(inst, prompt=tuple(float(v) for v in centre), bbox=bbox, mask=mask))
    return pieces


def place_between_blobs(found: list[Particle], peaks: np.ndarray, response: np.ndarray) -> None:
    """Each particle's ``centre``: the mean of the strong blob peaks inside its mask (a
    filament's ends, a dimer's halves); left as it is where its mask holds fewer than two.
    ``peaks``, ``response``: the class's blob peaks on the tomogram, (K, 3) ZYX and (K,)."""
    for particle in found:
        strong = strong_peaks(*blob_peaks_in(particle.instance, peaks, response))[0]
        if len(strong) >= 2:
            particle.centre = tuple(float(v) for v in strong.mean(axis=0))


def _stacked(offset: np.ndarray, reach: float, stretch: float) -> bool:
    """Whether two blobs ``offset`` (3,) ZYX voxels apart are two particles stacked along z:
    further apart than ``reach`` once z is shrunk by the class's ``stretch`` (where its
    particles are round again), and more along z than across (the 2D segmenter already cuts
    touching neighbours within a slice)."""
    round_offset = np.array([offset[0] / stretch, offset[1], offset[2]])
    along, across = abs(round_offset[0]), float(np.linalg.norm(round_offset[1:]))
    return float(np.linalg.norm(round_offset)) > reach and along >= across
