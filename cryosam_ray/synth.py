"""Realistic synthetic cryo-ET tomograms with ground truth, deterministic for a seed.

A scene of particles (ribosome, ATP synthase dimer, HSP60 barrel) at uniformly random 3D
orientations, packed without overlap, plus curved lipid bilayers and very dense gold beads, is
imaged like a tilt series: a missing wedge (tilt about y, beam along z), a CTF-like band-pass
and white Gaussian noise at a given SNR. Particles come from real density maps in
``../shared/data`` when that folder exists, otherwise from built-in shapes of the right size.

Arrays are ZYX: ``volume[z, y, x]``, coordinates in voxels. Labels hold one id per particle
(membranes and beads are background), matching ``truth[i]["instance_id"]``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import mrcfile
import numpy as np
import scipy.fft
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation
from scipy.special import erfc

from cryosam_ray.errors import ConfigError
from cryosam_ray.tomo_io import write_mrc

log = logging.getLogger(__name__)

CLASSES = ("ribosome", "atpase", "hsp60")
POLARITIES = ("raw", "inverted")
TRUTH_COLUMNS = ("tomogram", "class", "instance_id", "z", "y", "x", "radius", "voxel_size_a")
MAP_FILES = {"ribosome": "ribosome70S_empiar10499_12A.mrc", "atpase": "atpase_chlamy_7.84A.mrc",
             "hsp60": "hsp60_chlamy.mrc"}
DATA_DIR_ENV = "CRYOSAM_DATA_DIR"
_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

_LABEL_LEVEL = 0.35  # label = rendered density above this (protein ~ 1.0)
_PACK_MARGIN = 2.0  # voxels between bounding spheres, and between a sphere and the volume edge
_MEMBRANE_DENSITY = 0.8
_LEAFLET_SEPARATION_A = 40.0
_LEAFLET_SIGMA_A = 7.0
_BEAD_DENSITY = 8.0  # gold: far denser than protein, an outlier for intensity normalisers
_BEAD_RADIUS_VOX = (3.0, 4.0)
_WAVELENGTH_A = 0.0197  # electrons at 300 kV


@dataclass(frozen=True)
class SynthSettings:
    """What to synthesise. Every field is validated on construction (``ConfigError``, a ValueError).

    Attributes:
        shape: (D, H, W) = (nz, ny, nx) voxels, each side >= 16.
        voxel_size_a: voxel size in Angstrom; particles are rendered at their physical size.
        classes: particle classes, from ``CLASSES``.
        particles_per_class: attempted per class; fewer are placed when packing fails (logged).
        membranes: curved lipid bilayers crossing the volume.
        gold_beads: small, very dense spheres (fiducials).
        snr: signal variance / noise variance, the signal measured after the imaging filters.
        tilt_range: +- degrees of the simulated tilt series, in (0, 90]; 90 means no missing wedge.
        polarity: "raw" (dense is dark, as reconstructed) or "inverted" (dense is bright).
        use_real_maps: render particles from the real density maps when they can be found.
        data_dir: folder with the maps; default ``$CRYOSAM_DATA_DIR``, else ``<repo>/../shared/data``.
    """

    shape: tuple[int, int, int] = (96, 192, 192)
    voxel_size_a: float = 10.0
    classes: tuple[str, ...] = CLASSES
    particles_per_class: int = 12
    membranes: int = 1
    gold_beads: int = 3
    snr: float = 0.3
    tilt_range: float = 60.0
    polarity: str = "raw"
    use_real_maps: bool = True
    data_dir: str | None = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 16:
            raise ConfigError(f"shape must be 3 sides (D, H, W), each >= 16 voxels; got {tuple(self.shape)}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "classes", tuple(self.classes))
        if not (math.isfinite(self.voxel_size_a) and self.voxel_size_a > 0):
            raise ConfigError(f"voxel_size_a must be a positive number of Angstrom; got {self.voxel_size_a!r}")
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown:
            raise ConfigError(f"unknown class {unknown[0]!r} in classes; expected names from {CLASSES}")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must be one or more distinct names from {CLASSES}; got {self.classes}")
        for key in ("particles_per_class", "membranes", "gold_beads"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"{key} must be a count >= 0; got {getattr(self, key)}")
        if not (math.isfinite(self.snr) and self.snr > 0):
            raise ConfigError(f"snr must be > 0 (signal variance / noise variance); got {self.snr}")
        if not 0 < self.tilt_range <= 90:
            raise ConfigError(f"tilt_range must be in (0, 90] degrees; got {self.tilt_range}")
        if self.polarity not in POLARITIES:
            raise ConfigError(f"polarity must be one of {POLARITIES}; got {self.polarity!r}")


@dataclass
class SynthTomogram:
    """One synthetic tomogram and its ground truth.

    Attributes:
        name: tomogram id used in ``truth`` (``synth_000``).
        volume: (D, H, W) float32 ZYX, the imaged tomogram.
        labels: (D, H, W) int32, particle instance ids, 0 = background (membranes, beads included).
        truth: one dict per particle with ``TRUTH_COLUMNS`` keys, in voxels: z, y, x the centre of
            mass (the nearest particle voxel if it falls in a gap), radius the bounding radius.
        membranes: one dict per bilayer: sphere centre z, y, x and radius (voxels, may lie outside).
        beads: one dict per gold bead: z, y, x, radius (voxels).
    """

    name: str
    volume: np.ndarray
    labels: np.ndarray
    truth: list[dict]
    membranes: list[dict] = field(default_factory=list)
    beads: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _Template:
    """A class at one voxel size: density (protein ~1), centre (template voxels, ZYX) and the
    bounding radius of its label mask about that centre, plus a margin for interpolation."""

    density: np.ndarray
    centre: np.ndarray
    radius: float


def synthesize(settings: SynthSettings, *, seed: int, name: str = "synth_000") -> SynthTomogram:
    """Build one synthetic tomogram. Same settings and seed give a bit-identical result.

    The scene is drawn from one random stream and the noise from another, so changing only
    ``snr`` keeps the scene and the noise pattern (just rescaled).

    Raises:
        ConfigError: a negative seed, or ``data_dir`` given but not a folder.
    """
    if int(seed) < 0:
        raise ConfigError(f"seed must be >= 0; got {seed}")
    scene_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    templates = _templates(settings)
    membranes = _draw_membranes(settings, scene_rng)
    placed, beads = _place(settings, templates, membranes, scene_rng)
    signal = np.zeros(settings.shape, np.float32)
    labels = np.zeros(settings.shape, np.int32)
    truth = []
    for instance_id, (cls, centre) in enumerate(placed, start=1):
        # a normalised Gaussian 4-vector is a uniformly random rotation (any scipy version)
        rotation = Rotation.from_quat(scene_rng.standard_normal(4)).as_matrix()
        _render_particle(signal, labels, templates[cls], centre, rotation, instance_id)
        truth.append(dict(zip(TRUTH_COLUMNS, (name, cls, instance_id, *np.round(centre, 3).tolist(),
                                              round(templates[cls].radius, 3), settings.voxel_size_a))))
    _render_membranes(signal, membranes, settings.voxel_size_a)
    _render_beads(signal, beads)
    volume = _image(signal, settings, noise_rng)
    spheres = [[{**dict(zip("zyx", np.round(c, 3).tolist())), "radius": round(r, 3)} for c, r in group]
               for group in (membranes, beads)]
    return SynthTomogram(name, volume, labels, truth, membranes=spheres[0], beads=spheres[1])


def write_dataset(out_dir: str, *, n: int = 2, seed: int = 0,
                  settings: SynthSettings = SynthSettings()) -> list[str]:
    """Write ``n`` tomograms ``synth_000 ...`` with labels and one ``truth.csv`` into ``out_dir``.

    Files: ``<name>.mrc`` (float32 tomogram), ``<name>_labels.mrc`` (instance ids),
    ``truth.csv`` (``TRUTH_COLUMNS``, every particle of every tomogram) and ``prompts.csv``
    (one point prompt per class: the first particle of that class in the dataset, as a user
    would click it, for trying the pipeline). Tomogram ``i`` uses a seed derived from
    ``(seed, i)``. Returns the tomogram MRC paths (not the label files).
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0 tomograms; got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i in range(n):
        name = f"synth_{i:03d}"
        tomo = synthesize(settings, seed=derive_seed(seed, i), name=name)
        paths.append(write_mrc(out / f"{name}.mrc", tomo.volume, settings.voxel_size_a))
        write_mrc(out / f"{name}_labels.mrc", tomo.labels, settings.voxel_size_a)
        rows.extend(tomo.truth)
        log.info("%s: %d particles, %d gold beads", name, len(tomo.truth), len(tomo.beads))
    with open(out / "truth.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TRUTH_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    first_of_class = {}
    for row in rows:
        first_of_class.setdefault(row["class"], row)
    with open(out / "prompts.csv", "w", newline="") as fh:  # written last: the dataset is complete
        writer = csv.DictWriter(fh, fieldnames=("tomogram", "z", "y", "x", "class"), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(first_of_class.values())
    return [str(p) for p in paths]


def derive_seed(seed: int, index: int) -> int:
    """The seed of tomogram ``index`` in a dataset seeded with ``seed`` (stable across runs)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


# ---------------------------------------------------------------- imaging

def missing_wedge_mask(shape: tuple[int, int, int], tilt_range: float) -> np.ndarray:
    """Fourier coefficients a +-``tilt_range`` tilt series about y measures (beam along z).

    Each projection at tilt t fills the central plane that contains the ky axis and the
    direction (kz, kx) = (sin t, cos t). A coefficient is kept when the angle of (kz, kx) from
    the kx axis is within the tilt range, ``|kz| <= tan(tilt_range) * |kx|``; ky plays no part.
    The missing wedge around kz blurs the volume along z: particles look elongated in z.

    Returns:
        (D, H, W // 2 + 1) bool, in ``numpy.fft.rfftn`` layout for a (D, H, W) = ``shape`` volume.
    """
    kz, _, kx = (np.abs(k) for k in _frequencies(shape))
    theta = math.radians(tilt_range)
    # written with sin/cos so that tilt_range = 90 keeps everything; the DC term is always kept
    keep = kz * math.cos(theta) <= kx * math.sin(theta) + 1e-7
    return np.broadcast_to(keep, (*shape[:2], shape[2] // 2 + 1)).copy()


def _frequencies(shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kz, ky, kx in cycles per voxel, float32, broadcastable to the rfftn layout of ``shape``."""
    return (np.fft.fftfreq(shape[0]).astype(np.float32)[:, None, None],
            np.fft.fftfreq(shape[1]).astype(np.float32)[None, :, None],
            np.fft.rfftfreq(shape[2]).astype(np.float32)[None, None, :])


def ctf_bandpass(shape: tuple[int, int, int], voxel_size_a: float, *, defocus_um: float = 3.0,
                 amplitude_contrast: float = 0.07, ctf_weight: float = 0.5, highpass_a: float = 800.0,
                 bfactor: float = 1500.0) -> np.ndarray:
    """A CTF-like real filter: (1 - w + w * CTF(k)) * high-pass * B-factor envelope.

    CTF(k) = sqrt(1 - A^2) sin(chi) + A cos(chi), chi = pi * lambda * defocus * k^2 (300 kV,
    spherical aberration negligible at tomographic resolution), positive at low k so dense stays
    bright. ``ctf_weight`` w < 1 restores part of the low-frequency contrast the CTF removes, as
    the deconvolution filters applied to tomograms do, so particles stay visible at snr ~ 0.3.
    The Gaussian high-pass removes structure coarser than ``highpass_a`` (uneven ice).

    Returns:
        (D, H, W // 2 + 1) float32 in ``rfftn`` layout; k in 1/Angstrom from ``voxel_size_a``.
    """
    kz, ky, kx = _frequencies(shape)
    k2 = (kz * kz + ky * ky + kx * kx) / np.float32(voxel_size_a**2)
    chi = np.float32(math.pi * _WAVELENGTH_A * defocus_um * 1e4) * k2
    ctf = math.sqrt(1 - amplitude_contrast**2) * np.sin(chi) + amplitude_contrast * np.cos(chi)
    highpass = 1 - np.exp(-k2 * np.float32(highpass_a**2 / 2))
    envelope = np.exp(-k2 * np.float32(bfactor / 4))
    return ((1 - ctf_weight + ctf_weight * ctf) * highpass * envelope).astype(np.float32)


def _image(signal: np.ndarray, settings: SynthSettings, rng: np.random.Generator) -> np.ndarray:
    """Missing wedge and band-pass in Fourier space, noise at ``settings.snr``, polarity, offset."""
    spectrum = scipy.fft.rfftn(signal, workers=-1)
    spectrum *= missing_wedge_mask(signal.shape, settings.tilt_range)
    spectrum *= ctf_bandpass(signal.shape, settings.voxel_size_a)
    volume = scipy.fft.irfftn(spectrum, s=signal.shape, workers=-1).astype(np.float32, copy=False)
    signal_var = float(volume.var(dtype=np.float64))
    noise_sd = np.float32(math.sqrt(signal_var / settings.snr))
    volume += rng.standard_normal(signal.shape, dtype=np.float32) * noise_sd
    if settings.polarity == "raw":
        np.negative(volume, out=volume)
    # real reconstructions are not zero-mean; a picker must not rely on it
    volume += np.float32(rng.uniform(0.2, 1.0) * math.sqrt(signal_var * (1 + 1 / settings.snr)))
    return volume


# ---------------------------------------------------------------- particle templates

def resolve_data_dir(settings: SynthSettings) -> Path | None:
    """The maps folder: ``settings.data_dir`` (must exist), else ``$CRYOSAM_DATA_DIR``, else
    ``<repo>/../shared/data``; None (built-in shapes) when not wanted or not there."""
    if not settings.use_real_maps:
        return None
    if settings.data_dir is not None:
        path = Path(settings.data_dir)
        if not path.is_dir():
            raise ConfigError(f"data_dir {path} is not a folder; expected one holding {sorted(MAP_FILES.values())}")
        return path
    path = Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else _DEFAULT_DATA_DIR
    if path.is_dir():
        return path
    log.info("no density maps at %s: using built-in particle shapes", path)
    return None


def _templates(settings: SynthSettings) -> dict[str, _Template]:
    data_dir, out = resolve_data_dir(settings), {}
    for cls in settings.classes:
        map_path = data_dir / MAP_FILES[cls] if data_dir is not None else None
        if map_path is not None and not map_path.is_file():
            log.warning("%s missing: rendering %s from its built-in shape", map_path, cls)
            map_path = None
        out[cls] = _template(cls, float(settings.voxel_size_a), map_path and str(map_path))
    return out


@lru_cache(maxsize=32)
def _template(cls: str, voxel_size_a: float, map_path: str | None) -> _Template:
    density = _real_density(map_path, voxel_size_a) if map_path else _builtin_density(cls, voxel_size_a)
    mask = _largest_component(density > _LABEL_LEVEL)
    centre = _inside_centre(density, mask)
    radius = float(np.sqrt(((np.argwhere(mask) - centre) ** 2).sum(axis=1).max())) + 1.0  # +1: interpolation
    density.setflags(write=False)  # shared by every tomogram through the cache
    log.debug("%s template from %s: radius %.1f voxels", cls, map_path or "built-in shape", radius)
    return _Template(density, centre, radius)


def _inside_centre(density: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The centre of mass, or the nearest mask voxel when it falls in a gap (a V-shaped dimer),
    so that a particle's truth coordinate always lies on the particle."""
    centre = np.array(ndi.center_of_mass(density))
    nearest = tuple(np.round(centre).astype(int))
    if mask[nearest]:
        return centre
    _, indices = ndi.distance_transform_edt(~mask, return_indices=True)
    return indices[(slice(None), *nearest)].astype(float)


def _real_density(map_path: str, voxel_size_a: float) -> np.ndarray:
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
    data *= ndi.binary_dilation(_largest_component(data > 0.1 * data.max()), iterations=2)
    return (data / np.median(data[data > 0.2 * data.max()])).astype(np.float32)


def _builtin_density(cls: str, voxel_size_a: float) -> np.ndarray:
    """Blurred binary shape of ``cls`` with mild internal texture, protein ~1.0."""
    half = int(math.ceil(170.0 / voxel_size_a)) + 3
    z, y, x = (np.arange(-half, half + 1, dtype=np.float32) * np.float32(voxel_size_a) for _ in range(3))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    shape = {"ribosome": _ribosome, "atpase": _atpase, "hsp60": _hsp60}[cls](z, y, x)
    density = ndi.gaussian_filter(shape.astype(np.float32), 0.7)
    rng = np.random.default_rng(zlib.crc32(cls.encode()))  # fixed texture per class
    texture = ndi.gaussian_filter(rng.standard_normal(density.shape).astype(np.float32), 1.0)
    return density * (1 + 0.15 * texture / texture.std())


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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndi.label(mask)
    if count <= 1:
        return labelled > 0
    return labelled == 1 + int(np.bincount(labelled.ravel())[1:].argmax())


# ---------------------------------------------------------------- scene

def _draw_membranes(settings: SynthSettings, rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """Spheres (centre ZYX, radius; voxels) whose surfaces cross the volume as gently curved sheets.
    Normals stay within 25 deg of the xy plane: a sheet parallel to xy would fill a thin
    tomogram's depth and leave no room for particles."""
    shape = np.array(settings.shape, float)
    out = []
    for _ in range(settings.membranes):
        point = shape * rng.uniform([0.3, 0.25, 0.25], [0.7, 0.75, 0.75])
        azimuth, elevation = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(-25, 25))
        normal = np.array([math.sin(elevation), math.cos(elevation) * math.sin(azimuth),
                           math.cos(elevation) * math.cos(azimuth)])
        radius = float(rng.uniform(1.5, 4.0) * shape.max())
        out.append((point - radius * normal, radius))
    return out


def _pack(settings, radii_new, membranes, rng, centres: list, radii: list) -> list:
    """Random sequential packing: a centre (or None) per new sphere in ``radii_new`` (voxels),
    inside the volume and clear of earlier spheres (``centres``, ``radii``, extended in place)
    and of membranes by ``_PACK_MARGIN``. Up to 4096 candidates per sphere, in batches."""
    shape = np.array(settings.shape, float)
    half_width = (_LEAFLET_SEPARATION_A / 2 + 2 * _LEAFLET_SIGMA_A) / settings.voxel_size_a
    spots = []
    for radius in radii_new:
        low, high, spot = radius + _PACK_MARGIN, shape - 1 - radius - _PACK_MARGIN, None
        for _ in range(16 if np.all(high >= low) else 0):
            cand = rng.uniform(low, high, size=(256, 3))
            ok = np.ones(len(cand), bool)
            if centres:
                dist = np.linalg.norm(cand[:, None, :] - np.asarray(centres)[None], axis=-1)
                ok &= (dist >= radius + np.asarray(radii)[None] + _PACK_MARGIN).all(axis=1)
            for centre, sphere_r in membranes:
                gap = np.abs(np.linalg.norm(cand - centre, axis=1) - sphere_r)
                ok &= gap >= radius + half_width + _PACK_MARGIN
            if ok.any():
                spot = cand[int(ok.argmax())]
                centres.append(spot)
                radii.append(radius)
                break
        spots.append(spot)
    return spots


def _place(settings, templates, membranes, rng):
    """Particles, largest class first (fewer packing failures), then gold beads clear of them.
    Returns [(class, centre)] and [(bead centre, bead radius)], ZYX voxels."""
    order = sorted((c for c in settings.classes for _ in range(settings.particles_per_class)),
                   key=lambda c: -templates[c].radius)
    centres, radii = [], []
    spots = _pack(settings, [templates[c].radius for c in order], membranes, rng, centres, radii)
    for cls in settings.classes:
        missed = sum(spot is None for c, spot in zip(order, spots) if c == cls)
        if missed:
            log.info("placed %d of %d %s particles: no free space for the rest in shape %s",
                        settings.particles_per_class - missed, settings.particles_per_class, cls, settings.shape)
    bead_radii = rng.uniform(*_BEAD_RADIUS_VOX, size=settings.gold_beads).tolist()
    bead_spots = _pack(settings, bead_radii, membranes, rng, centres, radii)
    if any(spot is None for spot in bead_spots):
        log.warning("no free space for some gold beads in shape %s", settings.shape)
    return ([(c, spot) for c, spot in zip(order, spots) if spot is not None],
            [(spot, r) for spot, r in zip(bead_spots, bead_radii) if spot is not None])


def _box(centre: np.ndarray, half: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """Corners [low, high) of a box of half-size ``half`` around ``centre``, clipped to the volume."""
    middle = np.round(centre).astype(int)
    return np.maximum(middle - half, 0), np.minimum(middle + half + 1, shape)


def _render_particle(signal, labels, template: _Template, centre, rotation, instance_id: int) -> None:
    """Add the rotated template at ``centre`` to ``signal``; label its voxels above the level."""
    low, high = _box(centre, int(math.ceil(template.radius)) + 2, signal.shape)
    inverse = rotation.T  # output voxel p samples the template at R^T (p - centre) + template centre
    offset = template.centre + inverse @ (low - centre)
    density = ndi.affine_transform(template.density, inverse, offset=offset, output_shape=tuple(high - low),
                                   order=1, prefilter=False)
    window = tuple(slice(a, b) for a, b in zip(low, high))
    signal[window] += density
    # one connected region per instance, even where interpolation frays a thin part
    labels[window][_largest_component(density > _LABEL_LEVEL)] = instance_id


def _render_membranes(signal, membranes, voxel_size_a: float) -> None:
    """Two Gaussian leaflets either side of each sphere surface (a lipid bilayer)."""
    offset = _LEAFLET_SEPARATION_A / 2 / voxel_size_a
    inv_two_var = np.float32(1 / (2 * (_LEAFLET_SIGMA_A / voxel_size_a) ** 2))
    for centre, radius in membranes:
        dist = _distance((0, 0, 0), signal.shape, centre) - np.float32(radius)
        for side in (-offset, offset):
            signal += np.float32(_MEMBRANE_DENSITY) * np.exp(-((dist - np.float32(side)) ** 2) * inv_two_var)


def _render_beads(signal, beads) -> None:
    """Solid spheres with a Gaussian-blurred edge (erfc profile), ``_BEAD_DENSITY`` inside."""
    for centre, radius in beads:
        low, high = _box(centre, int(math.ceil(radius)) + 3, signal.shape)
        dist = _distance(low, high, centre)
        window = tuple(slice(a, b) for a, b in zip(low, high))
        edge = erfc((dist - radius) / np.float32(math.sqrt(2) * 0.7))  # a ball blurred by sigma 0.7
        signal[window] += (0.5 * _BEAD_DENSITY * edge).astype(np.float32)


def _distance(low, high, centre) -> np.ndarray:
    """(high - low) float32 box of distances from ``centre`` (volume voxels, ZYX) to each voxel."""
    dz, dy, dx = (np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(low, high, centre))
    return np.sqrt(dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2)
