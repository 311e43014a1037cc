"""Realistic synthetic cryo-ET tomograms with ground truth, deterministic for a seed.

A scene of particles (ribosome, ATP synthase dimer, HSP60 barrel; optionally a small ball and
a short rod) at uniformly random 3D orientations, packed without overlap or, with
``crowding``, partly touching one another, plus curved lipid bilayers and very dense gold
beads, is imaged like a tilt series: a missing wedge (tilt about y, beam along z), a CTF-like
band-pass and white Gaussian noise at a given SNR. Particles come from real density maps in
``../shared/data`` when that folder exists, otherwise from built-in shapes of the right size
(``cryosam_ray.synth_shapes``).

Arrays are ZYX: ``volume[z, y, x]``, coordinates in voxels. Labels hold one id per particle
(membranes and beads are background), matching ``truth[i]["instance_id"]``.
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from cryosam_ray.errors import ConfigError
from cryosam_ray.synth_imaging import image_like_a_tilt_series, missing_wedge_mask  # noqa: F401 (re-exported)
from cryosam_ray.synth_shapes import (CLASSES, DATA_DIR_ENV, LEAFLET_SEPARATION_A,  # noqa: F401 (re-exported)
                                      LEAFLET_SIGMA_A, Template, class_templates, rasterise, render_beads,
                                      render_membranes, render_particle, resolve_data_dir, stamp)
from cryosam_ray.tomo_io import write_mrc

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("ribosome", "atpase", "hsp60")  # CLASSES (all names) adds "ball" and "rod"
POLARITIES = ("raw", "inverted")
TRUTH_COLUMNS = ("tomogram", "class", "instance_id", "z", "y", "x", "radius", "voxel_size_a")
PROMPT_COLUMNS = ("tomogram", "z", "y", "x", "class")

_PACK_MARGIN = 2.0  # voxels between bounding spheres, and between a sphere and the volume edge
_TOUCH_TRIES = 32  # anchor and direction draws for a touching particle before packing it freely
_NEIGHBOURS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)  # 3x3x3
_BEAD_RADIUS_VOX = (3.0, 4.0)


@dataclass(frozen=True)
class SynthSettings:
    """What to synthesise. Every field is validated on construction (``ConfigError``, a ValueError).

    Attributes:
        shape: (D, H, W) = (nz, ny, nx) voxels, each side >= 16.
        voxel_size_a: voxel size in Angstrom; particles are rendered at their physical size.
        classes: particle classes, distinct names from ``CLASSES``: "ribosome" (70S, ~260 A),
            "atpase" (ATP synthase dimer, ~270 A), "hsp60" (barrel, 140 x 150 A), "ball" (solid
            sphere 90 A across) and "rod" (filament segment 70 A across, 320 A long).
        particles_per_class: attempted per class; fewer are placed when packing fails (logged).
        membranes: curved lipid bilayers crossing the volume.
        gold_beads: small, very dense spheres (fiducials).
        snr: signal variance / noise variance, the signal measured after the imaging filters.
        tilt_range: +- degrees of the simulated tilt series, in (0, 90]; 90 means no missing wedge.
        polarity: "raw" (dense is dark, as reconstructed) or "inverted" (dense is bright).
        use_real_maps: render particles from the real density maps when they can be found.
        data_dir: folder with the maps; default ``$CRYOSAM_DATA_DIR``, else ``<repo>/../shared/data``.
        crowding: in [0, 1], the fraction of particles placed touching an earlier-placed one (as
            in crowded cytoplasm): label masks 1 voxel apart (adjacent voxels, 26-neighbourhood),
            never overlapping, no particle covering a neighbour's truth centre. 0 packs every
            particle with a free margin (bounding spheres >= 2 voxels apart), as before.
    """

    shape: tuple[int, int, int] = (96, 192, 192)
    voxel_size_a: float = 10.0
    classes: tuple[str, ...] = DEFAULT_CLASSES
    particles_per_class: int = 12
    membranes: int = 1
    gold_beads: int = 3
    snr: float = 0.3
    tilt_range: float = 60.0
    polarity: str = "raw"
    use_real_maps: bool = True
    data_dir: str | None = None
    crowding: float = 0.0

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
        if not (isinstance(self.crowding, numbers.Real) and 0 <= self.crowding <= 1):
            raise ConfigError(f"crowding must be a fraction in [0, 1] (of particles placed touching an "
                              f"earlier one); got {self.crowding!r}")


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


def synthesize(settings: SynthSettings, *, seed: int, name: str = "synth_000") -> SynthTomogram:
    """Build one synthetic tomogram. Same settings and seed give a bit-identical result.

    The scene is drawn from one random stream and the noise from another, so changing only
    ``snr`` keeps the scene and the noise pattern (just rescaled). With ``crowding`` > 0 a third
    stream places the touching particles; with 0 it is not used, so the scene is as it always was.

    Raises:
        ConfigError: a negative seed, or ``data_dir`` given but not a folder.
    """
    if int(seed) < 0:
        raise ConfigError(f"seed must be >= 0; got {seed}")
    # the first two children of spawn(3) are those of spawn(2): the third stream changes nothing else
    scene_rng, noise_rng, crowd_rng = (np.random.default_rng(s)
                                       for s in np.random.SeedSequence(int(seed)).spawn(3))
    templates = class_templates(settings)
    membranes = _draw_membranes(settings, scene_rng)
    signal = np.zeros(settings.shape, np.float32)
    labels = np.zeros(settings.shape, np.int32)
    centres, radii = [], []  # bounding spheres of everything placed, for packing
    if settings.crowding > 0:  # rendered as they are placed: touching needs the earlier masks
        placed = _place_crowded(settings, templates, membranes, (scene_rng, crowd_rng), centres, radii,
                                signal, labels)
        beads = _place_beads(settings, membranes, scene_rng, centres, radii)
    else:
        placed = _place_particles(settings, templates, membranes, scene_rng, centres, radii)
        beads = _place_beads(settings, membranes, scene_rng, centres, radii)
        for instance_id, (cls, centre) in enumerate(placed, start=1):
            render_particle(signal, labels, templates[cls], centre, _random_rotation(scene_rng), instance_id)
    truth = [dict(zip(TRUTH_COLUMNS, (name, cls, instance_id, *np.round(centre, 3).tolist(),
                                      round(templates[cls].radius, 3), settings.voxel_size_a)))
             for instance_id, (cls, centre) in enumerate(placed, start=1)]
    render_membranes(signal, membranes, settings.voxel_size_a)
    render_beads(signal, beads)
    volume = image_like_a_tilt_series(signal, snr=settings.snr, tilt_range=settings.tilt_range,
                                      voxel_size_a=settings.voxel_size_a, polarity=settings.polarity,
                                      rng=noise_rng)
    spheres = [[{**dict(zip("zyx", np.round(c, 3).tolist())), "radius": round(r, 3)} for c, r in group]
               for group in (membranes, beads)]
    return SynthTomogram(name, volume, labels, truth, membranes=spheres[0], beads=spheres[1])


def write_dataset(out_dir: str, *, n: int = 2, seed: int = 0, settings: SynthSettings = SynthSettings(),
                  prompts_per_class: int = 1) -> list[str]:
    """Write ``n`` tomograms ``synth_000 ...`` with labels and one ``truth.csv`` into ``out_dir``.

    Files: ``<name>.mrc`` (float32 tomogram, ZYX), ``<name>_labels.mrc`` (int32 instance ids),
    ``truth.csv`` (``TRUTH_COLUMNS``, every particle of every tomogram) and ``prompts.csv``
    (``PROMPT_COLUMNS``, voxels: point prompts as a user would click them, the first
    ``prompts_per_class`` particles of each class in the dataset, in truth order, grouped by
    class; fewer where a class has fewer particles). Tomogram ``i`` uses a seed derived from
    ``(seed, i)``. Returns the tomogram MRC paths (not the label files).

    Raises:
        ConfigError: ``n`` < 0 or ``prompts_per_class`` < 1 (nothing is written), or as ``synthesize``.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0 tomograms; got {n}")
    if isinstance(prompts_per_class, bool) or not isinstance(prompts_per_class, numbers.Integral) \
            or prompts_per_class < 1:
        raise ConfigError(f"prompts_per_class must be an integer >= 1; got {prompts_per_class!r}")
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
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    with open(out / "prompts.csv", "w", newline="") as fh:  # written last: the dataset is complete
        writer = csv.DictWriter(fh, fieldnames=PROMPT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for class_rows in by_class.values():
            writer.writerows(class_rows[:prompts_per_class])
    return [str(p) for p in paths]


def derive_seed(seed: int, index: int) -> int:
    """The seed of tomogram ``index`` in a dataset seeded with ``seed`` (stable across runs)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


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
    spots = []
    for radius in radii_new:
        low, high, spot = radius + _PACK_MARGIN, shape - 1 - radius - _PACK_MARGIN, None
        for _ in range(16 if np.all(high >= low) else 0):
            cand = rng.uniform(low, high, size=(256, 3))
            ok = _clear_of_membranes(settings, cand, radius, membranes)
            if centres:
                dist = np.linalg.norm(cand[:, None, :] - np.asarray(centres)[None], axis=-1)
                ok &= (dist >= radius + np.asarray(radii)[None] + _PACK_MARGIN).all(axis=1)
            if ok.any():
                spot = cand[int(ok.argmax())]
                centres.append(spot)
                radii.append(radius)
                break
        spots.append(spot)
    return spots


def _clear_of_membranes(settings, cand: np.ndarray, radius: float, membranes) -> np.ndarray:
    """(N,) bool: spheres of ``radius`` at ``cand`` (N, 3) keep ``_PACK_MARGIN`` from every bilayer."""
    half_width = (LEAFLET_SEPARATION_A / 2 + 2 * LEAFLET_SIGMA_A) / settings.voxel_size_a
    ok = np.ones(len(cand), bool)
    for centre, sphere_r in membranes:
        gap = np.abs(np.linalg.norm(cand - centre, axis=1) - sphere_r)
        ok &= gap >= radius + half_width + _PACK_MARGIN
    return ok


def _order(settings, templates) -> list[str]:
    """The particles to place, one class name each, largest class first (fewer packing failures)."""
    return sorted((c for c in settings.classes for _ in range(settings.particles_per_class)),
                  key=lambda c: -templates[c].radius)


def _place_particles(settings, templates, membranes, rng, centres, radii) -> list[tuple[str, np.ndarray]]:
    """Every particle packed with a free margin. Returns [(class, centre)], centres ZYX voxels."""
    order = _order(settings, templates)
    spots = _pack(settings, [templates[c].radius for c in order], membranes, rng, centres, radii)
    _log_missed(settings, order, spots)
    return [(c, spot) for c, spot in zip(order, spots) if spot is not None]


def _place_crowded(settings, templates, membranes, rngs, centres, radii, signal, labels):
    """As ``_place_particles``, but ``round(crowding * n)`` particles (never the first) are put
    touching an earlier one (``_touching_spot``; packed freely when no contact is found), and
    each particle is rendered into ``signal`` and ``labels`` (ids from 1) as it is placed."""
    scene_rng, rng = rngs
    order = _order(settings, templates)
    n_touch = min(round(settings.crowding * len(order)), max(len(order) - 1, 0))
    touching = set((1 + rng.permutation(max(len(order) - 1, 0))[:n_touch]).tolist())
    shape = np.array(settings.shape)
    near = np.zeros(settings.shape, bool)  # labelled voxels and their 26 neighbours
    reserved = np.zeros(settings.shape, bool)  # labelled voxels and the 3x3x3 about each truth centre
    placed, spots, touched = [], [], 0
    for k, cls in enumerate(order):
        tmpl, rotation = templates[cls], _random_rotation(rng)
        found = None
        if k in touching and placed:
            found = _touching_spot(settings, tmpl, rotation, membranes, placed, templates, near, reserved, rng)
        if found is not None:
            centre, low, density, mask = found
            centres.append(centre)
            radii.append(tmpl.radius)
            touched += 1
        else:
            centre = _pack(settings, [tmpl.radius], membranes, scene_rng, centres, radii)[0]
            if centre is not None:
                half = int(math.ceil(tmpl.radius)) + 2
                low = np.round(centre).astype(int) - half
                density, mask = rasterise(tmpl, centre, rotation, low, low + 2 * half + 1)
        spots.append(centre)
        if centre is None:
            continue
        placed.append((cls, centre))
        stamp(signal, labels, low, density, mask, len(placed))
        voxels = np.argwhere(mask) + low  # inside the volume: the bounding sphere keeps a margin
        near[tuple(np.clip((voxels[:, None] + _NEIGHBOURS).reshape(-1, 3), 0, shape - 1).T)] = True
        reserved[tuple(voxels.T)] = True
        reserved[tuple(np.clip(np.round(centre).astype(int) + _NEIGHBOURS, 0, shape - 1).T)] = True
    _log_missed(settings, order, spots)
    log.info("crowding %.2f: %d of %d particles touch an earlier one (%d asked)", settings.crowding,
             touched, len(placed), n_touch)
    return placed


def _touching_spot(settings, tmpl: Template, rotation, membranes, placed, templates, near, reserved, rng):
    """A place where the particle's label mask comes within one voxel (26-neighbourhood) of an
    earlier mask without overlapping any ``reserved`` voxel, its own truth centre clear of other
    masks, inside the volume and clear of membranes as ``_pack`` requires.

    Each try walks the particle toward a random earlier one from a random direction, 0.5 voxels
    a step, from where their bounding spheres are 1 voxel apart; the mask moves by whole voxels
    (the rendering is shifted, not redone), at most one per axis a step, so the walk meets
    ``near`` before it can overlap a mask. Returns (centre, box corner, density, mask), or None
    after ``_TOUCH_TRIES`` failed tries.
    """
    frac = rng.random(3)  # sub-voxel part of the centre
    half = int(math.ceil(tmpl.radius)) + 2
    low0 = np.round(frac).astype(int) - half
    density, mask = rasterise(tmpl, frac, rotation, low0, low0 + 2 * half + 1)
    offsets = np.argwhere(mask) + low0
    reach = max(tmpl.radius, float(np.abs(offsets - frac).max()))  # keeps every index inside the volume
    lowest, highest = reach + _PACK_MARGIN, np.array(settings.shape) - 1 - reach - _PACK_MARGIN
    for _ in range(_TOUCH_TRIES):
        anchor_cls, anchor = placed[int(rng.integers(len(placed)))]
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        for step in np.arange(templates[anchor_cls].radius + tmpl.radius + 1, -0.25, -0.5):
            shift = np.round(anchor + step * direction - frac).astype(int)
            centre = frac + shift
            if np.any(centre < lowest) or np.any(centre > highest):
                continue
            voxels = tuple((offsets + shift).T)
            if not near[voxels].any():
                continue
            own = tuple((np.round(centre).astype(int) + _NEIGHBOURS).T)
            if not (reserved[voxels].any() or reserved[own].any()) \
                    and _clear_of_membranes(settings, centre[None], tmpl.radius, membranes)[0]:
                return centre, low0 + shift, density, mask
            break  # first contact overlaps or is out of bounds: try another anchor and direction
    return None


def _log_missed(settings, order, spots) -> None:
    for cls in settings.classes:
        missed = sum(spot is None for c, spot in zip(order, spots) if c == cls)
        if missed:
            log.info("placed %d of %d %s particles: no free space for the rest in shape %s",
                     settings.particles_per_class - missed, settings.particles_per_class, cls, settings.shape)


def _place_beads(settings, membranes, rng, centres, radii) -> list[tuple[np.ndarray, float]]:
    """Gold beads clear of everything placed. Returns [(centre, radius)], ZYX voxels."""
    bead_radii = rng.uniform(*_BEAD_RADIUS_VOX, size=settings.gold_beads).tolist()
    bead_spots = _pack(settings, bead_radii, membranes, rng, centres, radii)
    if any(spot is None for spot in bead_spots):
        log.warning("no free space for some gold beads in shape %s", settings.shape)
    return [(spot, r) for spot, r in zip(bead_spots, bead_radii) if spot is not None]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """(3, 3) uniformly random rotation: a normalised Gaussian 4-vector is (any scipy version)."""
    return Rotation.from_quat(rng.standard_normal(4)).as_matrix()
