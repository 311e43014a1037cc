"""copick projects in and out, through the ``copick`` library itself.

In: each run's tomogram of one type at one voxel spacing (OME-Zarr, local or s3://) becomes a
tomogram of the run, named after the copick run (see :func:`cryosam_ray.tomo_io.tomogram_name`,
which reads the run from copick's ``ExperimentRuns/<run>/VoxelSpacing<A>/<type>.zarr`` layout);
the picks of one user (and session) become the prompts, the pick set's object name their class.
Out: per tomogram, every class's picks as copick picks of ``copick.user`` / ``copick.session``
(Angstrom, with the pick's score and instance id) and its instance masks as a binary copick
segmentation named after the class, written chunk by chunk.

copick point locations are in Angstrom, x/y/z, voxel ``i`` at ``i * voxel_spacing`` (copick's own
converters); a point's transformation adds its translation (Angstrom) to the location.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryosam_ray.config import CopickSection
from cryosam_ray.errors import CryoSamError

log = logging.getLogger(__name__)

PROMPTS_PREFIX = "copick:"


class CopickError(CryoSamError, ValueError):
    """A copick project, or what a run asks of it, that cannot be used."""


@dataclass(frozen=True)
class PromptSource:
    """``--prompts copick:USER[/SESSION]``: whose picks are the prompts."""

    user: str
    session: str | None

    @classmethod
    def parse(cls, spec: str) -> "PromptSource":
        user, _, session = spec[len(PROMPTS_PREFIX):].partition("/")
        if not user:
            raise CopickError(f"--prompts {spec}: expected copick:USER or copick:USER/SESSION")
        return cls(user, session or None)


def _import_copick():
    """copick, imported without its logging set-up: its modules call ``logging.basicConfig(
    force=True)`` with a rich handler at INFO when imported, which would replace the console's
    and run.log's handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        import copick
        import copick.util.log

        # Modules copick imports later (lazily) get a plain logger instead.
        copick.util.log.get_logger = lambda name, debug=False: logging.getLogger(name)
    except ImportError as exc:
        raise CopickError("--copick needs the copick library: pip install 'cryosam_ray[copick]'") from exc
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return copick


def open_project(path: str):
    """The copick root of the project config at ``path`` (a JSON file)."""
    copick = _import_copick()
    if not Path(path).is_file():
        raise CopickError(f"--copick {path}: no such file (expected a copick project config JSON)")
    try:
        kind = json.loads(Path(path).read_text()).get("config_type", "filesystem")
        if kind != "filesystem":  # tomograms are read at their URL in copick's filesystem layout
            raise CopickError(f"--copick {path}: config_type {kind!r}; only filesystem projects (local or s3://) "
                              "are supported")
        return copick.from_file(path)
    except CopickError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:  # bad JSON, a config copick refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CopickError(f"--copick {path}: not a usable copick project config: {first}") from exc


def _runs(root, section: CopickSection) -> list:
    runs = {run.name: run for run in root.runs}
    if section.runs is None:
        return [runs[name] for name in sorted(runs)]
    unknown = [name for name in section.runs if name not in runs]
    if unknown:
        raise CopickError(f"--copick {section.config}: no run {unknown} in the project (it has {sorted(runs)})")
    return [runs[name] for name in section.runs]


def _url(fs, path: str) -> str:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return path if {"file", "local"} & set(protocols) else fs.unstrip_protocol(path)


def tomogram_urls(section: CopickSection) -> list[str]:
    """URLs of the ``tomo_type`` tomograms at ``voxel_spacing`` of the project's (chosen) runs.
    Runs without one are skipped with a warning, or refused when named in ``runs``."""
    if section.voxel_spacing is None:
        raise CopickError("--copick needs --voxel-spacing (the Angstrom spacing of the tomograms to read)")
    root = open_project(section.config)
    urls, missing = [], []
    for run in _runs(root, section):
        spacing = run.get_voxel_spacing(section.voxel_spacing)
        tomogram = spacing.get_tomogram(section.tomo_type) if spacing is not None else None
        if tomogram is None:
            missing.append(run.name)
            continue
        fs, path = ((tomogram.fs_static, tomogram.static_path) if tomogram.read_only
                    else (tomogram.fs_overlay, tomogram.overlay_path))
        urls.append(_url(fs, path))
    what = f"no {section.tomo_type!r} tomogram at voxel spacing {section.voxel_spacing:g} A"
    if missing and (section.runs is not None or not urls):
        raise CopickError(f"--copick {section.config}: {what} in run(s) {missing}")
    if missing:
        log.warning("copick: %s in %d run(s), skipped: %s", what, len(missing), missing)
    return urls


def prompt_rows(section: CopickSection, source: PromptSource) -> list[tuple[str, float, float, float, str]]:
    """(run, z, y, x voxels, class) of every point of ``source``'s picks in the chosen runs."""
    root = open_project(section.config)
    rows = []
    for run in _runs(root, section):
        for picks in run.get_picks(user_id=source.user, session_id=source.session):
            for point in picks.points or []:
                shift = np.asarray(point.transformation)[:3, 3]
                xyz = np.array([point.location.x, point.location.y, point.location.z]) + shift
                x, y, z = xyz / section.voxel_spacing
                rows.append((run.name, float(z), float(y), float(x), picks.pickable_object_name))
    if not rows:
        who = source.user + (f"/{source.session}" if source.session else "")
        raise CopickError(f"--prompts copick:{who}: no picks of that user in the runs of {section.config}")
    return rows


def prompts_csv(rows) -> bytes:
    """The prompt rows as a prompts CSV (tomogram,z,y,x,class)."""
    lines = ["tomogram,z,y,x,class"] + [f"{r},{z!r},{y!r},{x!r},{c}" for r, z, y, x, c in rows]
    return ("\n".join(lines) + "\n").encode()


def prior_radii(section: CopickSection) -> dict[str, float]:
    """Class radii known beforehand, in voxels: the pickable objects' ``radius`` (Angstrom) over
    the voxel spacing, where the project states one; empty without a copick project. They become
    the queries' ``prior_radius`` (the size prior given to the segmenter)."""
    if not section.config or not section.voxel_spacing:
        return {}
    root = open_project(section.config)
    return {o.name: float(o.radius) / section.voxel_spacing for o in root.pickable_objects
            if getattr(o, "radius", None)}


def write_back(section: CopickSection, run_name: str, shape: tuple[int, int, int], particles, picks, classes) -> None:
    """One tomogram's picks and instance masks into its copick run (see the module docstring).

    Args:
        particles: the :class:`~cryosam_ray.particle.Particle` list, in the order of ``picks``.
        picks: the :class:`~cryosam_ray.particle.Pick` rows (ZYX voxels).
        classes: every class of the run: each gets a (possibly empty) pick set.
    """
    from copick.models import CopickLocation, CopickPoint

    from cryosam_ray.ome_zarr import write_label_image

    root = open_project(section.config)
    run = root.get_run(run_name)
    if run is None:
        raise CopickError(f"--copick {section.config}: no run {run_name!r} to write to")
    spacing = section.voxel_spacing
    objects = {o.name for o in root.pickable_objects}
    for cls in classes:
        if cls not in objects:
            log.warning("copick: class %r is no pickable object of %s: its picks are not written there",
                        cls, section.config)
            continue
        mine = [(particle, pick) for particle, pick in zip(particles, picks) if pick.cls == cls]
        points = [CopickPoint(location=CopickLocation(x=pick.x * spacing, y=pick.y * spacing, z=pick.z * spacing),
                              score=float(pick.score), instance_id=int(pick.instance_id)) for _, pick in mine]
        pick_set = run.new_picks(object_name=cls, session_id=section.session, user_id=section.user, exist_ok=True)
        pick_set.points = points
        pick_set.store()
        segmentation = run.new_segmentation(voxel_size=spacing, name=cls, session_id=section.session,
                                            is_multilabel=False, user_id=section.user, exist_ok=True)
        masks = [(p.instance.bbox, p.instance.mask, 1) for p, _ in mine if not p.instance.empty]
        write_label_image(_url(segmentation.fs, segmentation.path), shape, masks, spacing, dtype=np.uint8,
                          name=cls, storage_options=_fs_options(root, segmentation))


def _fs_options(root, segmentation) -> dict:
    """The project's fsspec options for where ``segmentation`` is written (remote roots only)."""
    args = root.config.static_fs_args if segmentation.read_only else root.config.overlay_fs_args
    return dict(args or {})
