"""What the objects of a synthetic tomogram look like, and their rendering into its signal.

Particles: a template is one class at one voxel size, from a real density map or a built-in
shape: a density volume (protein ~1.0, "dense = bright"), the voxel its truth coordinate maps
to, and the bounding radius of its label mask. Built-in shapes are written in Angstrom, so they
render at their physical size for any voxel size. ``rasterise`` rotates a template into a box
of the tomogram, ``stamp`` adds it to the signal and labels. Lipid bilayers and gold beads are
rendered analytically. Where to put the objects is ``cryosam_ray.synth``'s business.

Arrays are ZYX: ``density[z, y, x]``; centres and radii are in voxels.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mrcfile
import numpy as np
from scipy import ndimage as ndi
from scipy.special import erfc

from cryosam_ray.errors import ConfigError

log = logging.getLogger(__name__)

LABEL_LEVEL = 0.35  # label = rendered density above this (protein ~ 1.0)
MAP_FILES = {"ribosome": "ribosome70S_empiar10499_12A.mrc", "atpase": "atpase_chlamy_7.84A.mrc",
             "hsp60": "hsp60_chlamy.mrc"}  # classes without a map are always built-in shapes
DATA_DIR_ENV = "CRYOSAM_DATA_DIR"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MEMBRANE_DENSITY = 0.8
LEAFLET_SEPARATION_A = 40.0
LEAFLET_SIGMA_A = 7.0
BEAD_DENSITY = 8.0  # gold: far denser than protein, an outlier for intensity normalisers

_BALL_RADIUS_A = 45.0  # 90 A across: ~9 voxels at 10 A/px, near the scale a picker resolves
_ROD_RADIUS_A = 35.0  # 70 A across, like an actin filament or a thin microtubule segment
_ROD_LENGTH_A = 320.0  # tip to tip, the rounded ends included


@dataclass(frozen=True)
class Template:
    """A class at one voxel size.

    Attributes:
        density: (d, h, w) float32 ZYX, protein ~1.0, read-only (shared through a cache).
        centre: (3,) float, ZYX template voxels: the truth coordinate, always on the label mask.
        radius: bounding radius (voxels) of the label mask about ``centre``, +1 for interpolation.
    """

    density: np.ndarray
    centre: np.ndarray
    radius: float


def resolve_data_dir(settings) -> Path | None:
    """The maps folder for ``settings`` (a ``SynthSettings``): ``settings.data_dir`` (must
    exist), else ``$CRYOSAM_DATA_DIR``, else ``<repo>/../shared/data``; None (built-in shapes)
    when not wanted (``use_real_maps`` False) or not there.

    Raises:
        ConfigError: ``data_dir`` given but not a folder.
    """
    if not settings.use_real_maps:
        return None
    if settings.data_dir is not None:
        path = Path(settings.data_dir)
        if not path.is_dir():
            raise ConfigError(f"data_dir {path} is not a folder; expected one holding {sorted(MAP_FILES.values())}")
        return path
    path = Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else DEFAULT_DATA_DIR
    if path.is_dir():
        return path
    log.info("no density maps at %s: using built-in particle shapes", path)
    return None


def class_templates(settings) -> dict[str, Template]:
    """One template per class of ``settings`` at its voxel size; classes without a map are built-in."""
    data_dir, out = resolve_data_dir(settings), {}
    for cls in settings.classes:
        map_path = data_dir / MAP_FILES[cls] if data_dir is not None and cls in MAP_FILES else None
        if map_path is not None and not map_path.is_file():
            log.warning("%s missing: rendering %s from its built-in shape", map_path, cls)
            map_path = None
        out[cls] = template(cls, float(settings.voxel_size_a), map_path and str(map_path))
    return out


@lru_cache(maxsize=32)
def template(cls: str, voxel_size_a: float, map_path: str | None) -> Template:
    """The template of ``cls`` at ``voxel_size_a`` Angstrom per voxel, from the MRC map at
    ``map_path`` or, when None, from the built-in shape (see ``builtin_density``). Cached."""
    density = real_density(map_path, voxel_size_a) if map_path else builtin_density(cls, voxel_size_a)
    mask = largest_component(density > LABEL_LEVEL)
    centre = _inside_centre(density, mask)
    radius = float(np.sqrt(((np.argwhere(mask) - centre) ** 2).sum(axis=1).max())) + 1.0  # +1: interpolation
    density.setflags(write=False)  # shared by every tomogram through the cache
    log.debug("%s template from %s: radius %.1f voxels", cls, map_path or "built-in shape", radius)
    return Template(density, centre, radius)


def rasterise(tmpl: Template, centre: np.ndarray, rotation: np.ndarray, low: np.ndarray,
              high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The template rotated by ``rotation`` about its centre and moved to ``centre``, sampled on
    the voxel box ``[low, high)`` (ZYX voxels; the box may reach outside a volume).

    Args:
        rotation: (3, 3) matrix acting on ZYX vectors.

    Returns:
        density: (high - low) float32, linear interpolation.
        mask: (high - low) bool, the largest connected region above ``LABEL_LEVEL``: one region
            per instance, even where interpolation frays a thin part.
    """
    inverse = rotation.T  # output voxel p samples the template at R^T (p - centre) + template centre
    offset = tmpl.centre + inverse @ (low - centre)
    density = ndi.affine_transform(tmpl.density, inverse, offset=offset, output_shape=tuple(high - low),
                                   order=1, prefilter=False)
    return density, largest_component(density > LABEL_LEVEL)


def render_particle(signal, labels, tmpl: Template, centre, rotation, instance_id: int) -> None:
    """Add ``tmpl`` rotated by ``rotation`` at ``centre`` (ZYX voxels) to ``signal`` (D, H, W)
    float32 and set its label mask in ``labels`` (D, H, W) int32 to ``instance_id``."""
    low, high = _box(centre, int(math.ceil(tmpl.radius)) + 2, signal.shape)
    stamp(signal, labels, low, *rasterise(tmpl, centre, rotation, low, high), instance_id)


def stamp(signal, labels, low, density, mask, instance_id: int) -> None:
    """Add ``density`` (a box with corner ``low``, ZYX voxels, that may reach outside the volume)
    to ``signal`` and set ``labels`` to ``instance_id`` under ``mask`` (same shape as ``density``)."""
    lo, hi = np.maximum(low, 0), np.minimum(low + np.array(density.shape), signal.shape)
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    inner = tuple(slice(a, b) for a, b in zip(lo - low, hi - low))
    signal[window] += density[inner]
    labels[window][mask[inner]] = instance_id


def render_membranes(signal, membranes, voxel_size_a: float) -> None:
    """Add two Gaussian leaflets either side of each sphere surface (a lipid bilayer) to
    ``signal``; ``membranes`` is [(centre ZYX, radius)] in voxels."""
    offset = LEAFLET_SEPARATION_A / 2 / voxel_size_a
    inv_two_var = np.float32(1 / (2 * (LEAFLET_SIGMA_A / voxel_size_a) ** 2))
    for centre, radius in membranes:
        dist = _distance((0, 0, 0), signal.shape, centre) - np.float32(radius)
        for side in (-offset, offset):
            signal += np.float32(MEMBRANE_DENSITY) * np.exp(-((dist - np.float32(side)) ** 2) * inv_two_var)


def render_beads(signal, beads) -> None:
    """Add solid spheres with a Gaussian-blurred edge (erfc profile), ``BEAD_DENSITY`` inside, to
    ``signal``; ``beads`` is [(centre ZYX, radius)] in voxels."""
    for centre, radius in beads:
        low, high = _box(centre, int(math.ceil(radius)) + 3, signal.shape)
        dist = _distance(low, high, centre)
        window = tuple(slice(a, b) for a, b in zip(low, high))
        edge = erfc((dist - radius) / np.float32(math.sqrt(2) * 0.7))  # a ball blurred by sigma 0.7
        signal[window] += (0.5 * BEAD_DENSITY * edge).astype(np.float32)


def _box(centre: np.ndarray, half: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """Corners [low, high) of a box of half-size ``half`` around ``centre``, clipped to the volume."""
    middle = np.round(centre).astype(int)
    return np.maximum(middle - half, 0), np.minimum(middle + half + 1, shape)


def _distance(low, high, centre) -> np.ndarray:
    """(high - low) float32 box of distances from ``centre`` (volume voxels, ZYX) to each voxel."""
    dz, dy, dx = (np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(low, high, centre))
    return np.sqrt(dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2)


def real_density(map_path: str, voxel_size_a: float) -> np.ndarray:
    """A "dense = bright" map resampled to ``voxel_size_a``, dust removed, protein scaled to ~1."""
    with mrcfile.open(map_path, permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
        source_a = float(mrc.voxel_size.x)
    factor = source_a / voxel_size_a
    if factor < 1:  # anti-alias before shrinking
        data = ndi.gaussian_filter(data, 0.4 / factor)
    data = ndi.zoom(data, factor, order=1)
    data = np.pad(data, 2)
    # a soft threshold (subtract, clip) removes solvent noise without a hard step at the edge
    data = np.clip(data - 0.15 * data.max(), 0, None)
    data *= ndi.binary_dilation(largest_component(data > 0.1 * data.max()), iterations=2)
    return (data / np.median(data[data > 0.2 * data.max()])).astype(np.float32)


def builtin_density(cls: str, voxel_size_a: float) -> np.ndarray:
    """Blurred binary shape of ``cls`` with mild internal texture (fixed per class), protein ~1.0.

    Returns:
        (n, n, n) float32 ZYX, the shape centred in a cube of side ``n`` voxels that holds it at
        ``voxel_size_a`` Angstrom per voxel plus 3 voxels each side.
    """
    shape_fn, extent_a = _SHAPES[cls]
    half = int(math.ceil(extent_a / voxel_size_a)) + 3
    z, y, x = (np.arange(-half, half + 1, dtype=np.float32) * np.float32(voxel_size_a) for _ in range(3))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    density = ndi.gaussian_filter(shape_fn(z, y, x).astype(np.float32), 0.7)
    rng = np.random.default_rng(zlib.crc32(cls.encode()))  # fixed texture per class
    texture = ndi.gaussian_filter(rng.standard_normal(density.shape).astype(np.float32), 1.0)
    return density * (1 + 0.15 * texture / texture.std())


# Shapes take z, y, x in Angstrom from the box centre (broadcastable ZYX grids) and return a bool mask.

def _ribosome(z, y, x):
    """70S-like: large subunit (sphere r 105 A) and a flattened small subunit on top, ~260 A long."""
    large = z * z + y * y + (x + 10) ** 2 <= 105.0**2
    small = ((z - 115) / 40.0) ** 2 + ((y - 15) / 75.0) ** 2 + ((x + 10) / 62.0) ** 2 <= 1
    return large | small


def _atpase(z, y, x):
    """ATP synthase dimer: two (membrane disc, stalk, F1 head) monomers at 70 deg, ~270 A wide."""
    z = z + 60  # heads point up; centre the dimer in the box
    out = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), bool)
    for side in (-1, 1):
        tilt = math.radians(35) * side
        u = np.array([math.cos(tilt), 0.0, math.sin(tilt)])  # monomer axis (z, y, x)
        bz, bx = z, x - 25 * side  # monomer base
        along = bz * u[0] + bx * u[2]
        across = np.sqrt(np.maximum(bz * bz + y * y + bx * bx - along * along, 0))
        out |= (np.abs(along) <= 15) & (across <= 40)  # membrane part
        out |= (along >= 0) & (along <= 65) & (across <= 22)  # stalk
        out |= (along - 110) ** 2 + across**2 <= 50.0**2  # F1 head
    # peripheral stalks and dimer-specific subunits fill the foot of the V
    return out | ((z - 35) ** 2 / 40.0**2 + y * y / 30.0**2 + x * x / 45.0**2 <= 1)


def _hsp60(z, y, x):
    """Chaperonin double ring: 7-fold barrel, 140 A wide, 150 A tall, closed at the equator."""
    rho = np.sqrt(y * y + x * x)
    outer = 67 + 4 * np.cos(7 * np.arctan2(y, x))
    barrel = (np.abs(z) <= 75) & (rho <= outer) & (rho >= 26)
    groove = (np.abs(z) <= 5) & (rho > 58)  # between the two rings
    septum = (np.abs(z) <= 8) & (rho < 26)  # equatorial domains separate the two cavities
    return (barrel & ~groove) | septum


def _ball(z, y, x):
    """Small compact particle: a solid sphere 90 A across."""
    return z * z + y * y + x * x <= _BALL_RADIUS_A**2


def _rod(z, y, x):
    """Short filament: a cylinder 70 A across along z, 320 A long with hemispherical ends."""
    beyond = np.maximum(np.abs(z) - (_ROD_LENGTH_A / 2 - _ROD_RADIUS_A), 0)  # past the straight part
    return y * y + x * x + beyond * beyond <= _ROD_RADIUS_A**2


# class -> (shape, half extent of the box in Angstrom); 170 A for the first three fixes their
# box and so their texture: do not change it, or outputs for a seed change
_SHAPES = {"ribosome": (_ribosome, 170.0), "atpase": (_atpase, 170.0), "hsp60": (_hsp60, 170.0),
           "ball": (_ball, _BALL_RADIUS_A), "rod": (_rod, _ROD_LENGTH_A / 2)}
CLASSES = tuple(_SHAPES)  # every class name synthesize accepts


def _inside_centre(density: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The centre of mass, or the nearest mask voxel when it falls in a gap (a V-shaped dimer),
    so that a particle's truth coordinate always lies on the particle."""
    centre = np.array(ndi.center_of_mass(density))
    nearest = tuple(np.round(centre).astype(int))
    if mask[nearest]:
        return centre
    _, indices = ndi.distance_transform_edt(~mask, return_indices=True)
    return indices[(slice(None), *nearest)].astype(float)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected region of a bool array (all of it when there is one or none)."""
    labelled, count = ndi.label(mask)
    if count <= 1:
        return labelled > 0
    return labelled == 1 + int(np.bincount(labelled.ravel())[1:].argmax())
