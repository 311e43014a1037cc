"""RELION STAR files: picks written for RELION 4 or 5, prompts read from RELION 3, 4 or 5.

RELION 5 tomography (``--star-version 5``, the default): each particle is ``rlnTomoName`` and
``rlnCenteredCoordinate{X,Y,Z}Angst``, Angstrom from the tomogram's centre:
``X_A = (x - W / 2) * pixel size`` with ``x`` in 0-based voxels of a tomogram ``W`` voxels wide,
the same for y (H) and z (D). That is RELION 5's own convention (``tomogram_set.cpp``, branch
ver5.0: ``centre = (w0 / 2.0, h0 / 2.0, d0 / 2.0)``, float division; ``particle_set.cpp``,
``getParticleCoordDecenteredPixel``: ``pixel = angstrom / pixel size + centre``, no +1), and that
of the tools that feed it (pytom-match-pick, ArtiaX). ``data_particles`` comes first (RELION's
coordinate import reads a file's first data block), then ``data_optics`` states the pixel size
(``rlnTomoTiltSeriesPixelSize``), one optics group per voxel size of the run.

RELION 4 (``--star-version 4``) and 3: ``rlnCoordinate{X,Y,Z}`` in pixels (0-based, as this
project writes them: ``X = x``) of the stated pixel size; on reading, coordinates given at
another pixel size than the tomogram's (a binning) are scaled to its voxels.

Unit conversions are in :mod:`cryosam_ray.tables`. Every malformed file raises
:class:`~cryosam_ray.errors.TableError` naming the file.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cryosam_ray.errors import TableError
from cryosam_ray.storage import write_bytes_atomic
from cryosam_ray.tables import (Point, _column, _require, _voxel_size_for, centered_angstrom_to_zyx, star_xyz_to_zyx,
                                tomogram_stem, validate_picks, zyx_to_centered_angstrom, zyx_to_star_xyz)

log = logging.getLogger(__name__)

STAR_VERSIONS = (4, 5)
_PIXEL_LABELS = ("rlnTomoTiltSeriesPixelSize", "rlnImagePixelSize", "rlnMicrographPixelSize", "rlnDetectorPixelSize")


def write_star(table: pa.Table, path: str, *, version: int = 5, shapes: dict[str, tuple[int, int, int]] | None = None,
               cls: str | None = None, storage_options: dict | None = None) -> str:
    """Write picks as a RELION STAR file and return its path.

    Args:
        table: picks table (``voxel_size_a`` is the pixel size stated per optics group).
        version: 5: ``rlnCenteredCoordinate{X,Y,Z}Angst`` (needs ``shapes``); 4:
            ``rlnCoordinate{X,Y,Z}`` in voxels of the tomogram.
        shapes: tomogram name -> (D, H, W) voxels, for RELION 5's centred coordinates.
        cls: keep only that class.

    Both carry ``rlnAutopickFigureOfMerit`` (score) and ``rlnClassNumber`` (1, 2, ... over the
    sorted class names, spelled out in ``# cryosam_class N NAME`` comments read back by
    :func:`read_star_prompts`).
    """
    if version not in STAR_VERSIONS:
        raise ValueError(f"write_star({path}): version {version!r}; expected 4 or 5")
    table = validate_picks(table)
    if cls is not None:
        table = table.filter(pc.equal(table.column("class"), cls))
    cols = {n: table.column(n).to_pylist() for n in ("tomogram", "class", "z", "y", "x", "score", "voxel_size_a")}
    if version == 5:
        missing = sorted(set(cols["tomogram"]) - set(shapes or {}))
        if missing:
            raise TableError(str(path), f"RELION 5 centred coordinates need the shape of every tomogram; none for "
                                        f"{missing[:5]}")
    names = sorted(set(cols["class"]))
    number = {name: i + 1 for i, name in enumerate(names)}
    sizes = sorted({v for v in cols["voxel_size_a"] if v is not None and math.isfinite(v)})
    group = {v: i + 1 for i, v in enumerate(sizes)}
    # data_particles first: RELION's coordinate import reads a file's first data block.
    lines = ["", "# version 50001" if version == 5 else "# version 30001",
             f"# cryosam_ray picks for RELION {version}", *(f"# cryosam_class {number[n]} {n}" for n in names),
             "", "data_particles", "", "loop_"]
    axes = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"] if version == 5 else [f"rlnCoordinate{a}" for a in "XYZ"]
    labels = ["rlnTomoName", *axes, "rlnAutopickFigureOfMerit", "rlnClassNumber"] + (["rlnOpticsGroup"] if sizes else [])
    lines += [f"_{label} #{i + 1}" for i, label in enumerate(labels)]
    for i in range(table.num_rows):
        tomo, voxel = cols["tomogram"][i], cols["voxel_size_a"][i]
        if version == 5:
            xyz = zyx_to_centered_angstrom(cols["z"][i], cols["y"][i], cols["x"][i], shapes[tomo], voxel)
        else:
            xyz = zyx_to_star_xyz(cols["z"][i], cols["y"][i], cols["x"][i])
        name = f'"{tomo}"' if not tomo or re.search(r"\s", tomo) else tomo
        row = [name, *(repr(float(v)) for v in xyz), repr(cols["score"][i]), str(number[cols["class"][i]])]
        lines.append(" ".join(row + ([str(group[voxel])] if sizes else [])))
    lines += ["", "data_optics", "", "loop_", "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2",
              "_rlnTomoTiltSeriesPixelSize #3", *(f"{g} opticsGroup{g} {v!r}" for v, g in group.items())]
    return write_bytes_atomic(str(path), ("\n".join(lines) + "\n\n").encode(), storage_options=storage_options)


def read_star_prompts(path: str, text: str, voxel_size_a, shapes, default_class: str) -> list[Point]:
    """Prompt points (voxels, ZYX) from a RELION 3, 4 or 5 STAR file (see the module doc).

    Args:
        voxel_size_a: Angstrom per voxel, one value or one per tomogram name.
        shapes: tomogram name -> (D, H, W), for RELION 5's centred coordinates.
    """
    tables, class_names, pairs = parse_star(path, text)
    coord = next((t for t in tables if "rlnCoordinateX" in t[1]), None)
    centred = next((t for t in tables if "rlnCenteredCoordinateXAngst" in t[1]), None)
    block, labels, rows = coord or centred or (None, [], [])
    if block is None:
        found = "; ".join(f"data_{b}: {ls}" for b, ls, _ in tables) or "no loop_ tables"
        raise TableError(path, f"no data block with rlnCoordinateX/Y/Z or rlnCenteredCoordinateXAngst; found {found}")
    axes = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ") if coord else tuple(
        f"rlnCenteredCoordinate{a}Angst" for a in "XYZ")
    where = f"{path} (data_{block})"
    _require(labels, axes, where)
    name_label = next((n for n in ("rlnTomoName", "rlnMicrographName") if n in labels), None)
    if name_label is None:
        raise TableError(path, f"data_{block} names no tomogram: expected rlnTomoName or rlnMicrographName, "
                               f"found {labels}")
    if not rows:
        raise TableError(path, f"data_{block} has no rows")
    table = pa.table({label: [r[i] for r in rows] for i, label in enumerate(labels)})
    xs, ys, zs = (_column(table, a, "float", where).to_numpy() for a in axes)
    tomos = [tomogram_stem(t) for t in table.column(name_label).to_pylist()]
    if "rlnClassNumber" in labels:
        classes = [class_names.get(n, n) for n in map(str, _column(table, "rlnClassNumber", "int", where).to_pylist())]
    else:
        classes = [default_class] * len(tomos)
    star_pixel = _stated_pixel_size(tables, pairs, table, labels, where)
    points = []
    for i, tomo in enumerate(tomos):
        voxel = _voxel_size_for(tomo, voxel_size_a)
        if coord:
            z, y, x = star_xyz_to_zyx(xs[i], ys[i], zs[i])
            pixel = star_pixel[i] if star_pixel is not None else None
            if pixel is not None and voxel is not None and not math.isclose(pixel, voxel, rel_tol=1e-4):
                z, y, x = (v * pixel / voxel for v in (z, y, x))  # coordinates at another binning
        else:
            if not shapes or tomo not in shapes:
                raise TableError(path, f"RELION 5 centred coordinates need the shape of tomogram {tomo!r}: give the "
                                       f"tomogram (--tomogram / --tomograms) whose name the file uses")
            if voxel is None:
                raise TableError(path, f"RELION 5 centred coordinates (Angstrom) need the voxel size of {tomo!r}")
            z, y, x = centered_angstrom_to_zyx(xs[i], ys[i], zs[i], shapes[tomo], voxel)
        points.append(Point(tomo, float(z), float(y), float(x), classes[i]))
    return points


def _stated_pixel_size(tables, pairs: dict, particles: pa.Table, labels, where) -> np.ndarray | None:
    """Per row, the pixel size (Angstrom) the file states for its coordinates, or None."""
    optics = next((t for t in tables if t[0] == "optics"), None)
    if optics is not None:
        block, olabels, orows = optics
        label = next((p for p in _PIXEL_LABELS if p in olabels), None)
        if label is not None and orows:
            by_group = {r[olabels.index("rlnOpticsGroup")]: float(r[olabels.index(label)]) for r in orows} \
                if "rlnOpticsGroup" in olabels else {}
            if "rlnOpticsGroup" in labels and by_group:
                return np.array([by_group.get(g, np.nan) for g in particles.column("rlnOpticsGroup").to_pylist()])
            return np.full(particles.num_rows, float(orows[0][olabels.index(label)]))
    for label in _PIXEL_LABELS:
        if label in labels:
            return _column(particles, label, "float", where).to_numpy()
        if label in pairs:
            return np.full(particles.num_rows, float(pairs[label]))
    return None


def parse_star(path: str, text: str):
    """STAR text -> ``([(block, labels, rows)], {class number: class name}, {label: value})``:
    the loops, the class names this project writes as comments, and the key-value pairs."""
    tables, class_names, pairs = [], {}, {}
    block, labels, rows, state = None, [], [], None
    token = re.compile(r'"[^"]*"|\'[^\']*\'|\S+')
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            m = re.match(r"#\s*cryosam_class\s+(\S+)\s+(.+)$", s)
            if m:
                class_names[m.group(1)] = m.group(2).strip()
            continue
        if s.startswith("data_") and len(s.split()) == 1:  # a row may start with a data_... path
            block, state = s[5:], None
        elif s.startswith("loop_"):
            labels, rows, state = [], [], "labels"
            tables.append((block, labels, rows))
        elif s.startswith("_"):
            if state == "labels":
                labels.append(s.split()[0][1:])
            else:  # a key-value pair (data_general ...): kept, and it ends any loop
                parts = s.split(None, 1)
                pairs[parts[0][1:]] = parts[1].strip() if len(parts) > 1 else ""
                state = None
        elif state in ("labels", "rows"):
            state = "rows"
            values = [v[1:-1] if v[:1] in "\"'" and len(v) > 1 else v for v in token.findall(s)]
            if len(values) != len(labels):
                raise TableError(path, f"line {lineno}: expected {len(labels)} values for data_{block}, "
                                       f"found {len(values)}")
            rows.append(values)
        else:
            raise TableError(path, f"line {lineno}: unexpected text outside a loop_: {s[:60]!r}")
    return tables, class_names, pairs
