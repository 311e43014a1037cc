"""Pick, truth and prompt tables, their file formats, and every unit conversion of the project.

Coordinates are voxel coordinates (float64) in ZYX array order: voxel ``volume[k, j, i]`` has
its centre at ``(z, y, x) == (k, j, i)`` (0-based). Voxel sizes are in Angstrom. Files:

* picks: ``picks.parquet`` + ``picks.csv`` with :data:`PICK_COLUMNS`;
* truth: CSV/Parquet ``tomogram,class,instance_id,z,y,x,radius[,voxel_size_a]`` (radius in voxels);
* prompts: CSV (voxels), RELION STAR (read and written by :mod:`cryosam_ray.star`) or copick
  JSON (Angstrom).

RELION convention: ``rlnCoordinateX/Y/Z`` are written and read as the 0-based voxel position of
the tomogram being picked (``X = x``, ``Y = y``, ``Z = z``, no +1 offset), so a round trip is
exact. RELION 5 ``rlnCenteredCoordinate{X,Y,Z}Angst`` are Angstrom from the tomogram centre,
``x = X_A / voxel_size_a + W / 2`` (same for y with H and z with D). Every malformed file raises
:class:`~cryosam_ray.errors.TableError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cryosam_ray.errors import TableError
from cryosam_ray.storage import join, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

PICK_COLUMNS = ("tomogram", "class", "instance_id", "z", "y", "x", "voxel_size_a", "voxel_count",
                "score", "similarity", "pred_iou")
_TYPES = {"tomogram": pa.string(), "class": pa.string(), "instance_id": pa.int64(),
          "z": pa.float64(), "y": pa.float64(), "x": pa.float64(), "voxel_size_a": pa.float64(),
          "voxel_count": pa.int64(), "score": pa.float64(), "similarity": pa.float64(),
          "pred_iou": pa.float64(), "radius": pa.float64()}
PICKS_SCHEMA = pa.schema([(name, _TYPES[name]) for name in PICK_COLUMNS])
TRUTH_COLUMNS = ("tomogram", "class", "instance_id", "z", "y", "x", "radius")
# Pick columns that may be left out of picks_table rows / left empty in a CSV (value when absent).
_OPTIONAL = {"voxel_size_a": math.nan, "voxel_count": 0, "score": math.nan,
             "similarity": math.nan, "pred_iou": math.nan}
_VOLUME_SUFFIXES = (".ome.zarr", ".zarr", ".mrc", ".rec", ".map", ".st", ".ali", ".tomostar")
_IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


@dataclass(frozen=True)
class Point:
    """One prompt or pick: a position in voxels (ZYX) of tomogram ``tomogram`` (file stem)."""

    tomogram: str
    z: float
    y: float
    x: float
    cls: str = "default"


# ----------------------------------------------------------------------------- units

def voxels_to_angstrom(v, voxel_size_a):
    """Voxel coordinates or lengths -> Angstrom (``v * voxel_size_a``); arrays broadcast."""
    return np.multiply(v, _check_voxel_size(voxel_size_a), dtype=np.float64)


def angstrom_to_voxels(a, voxel_size_a):
    """Angstrom -> voxel coordinates or lengths (``a / voxel_size_a``); arrays broadcast."""
    return np.divide(a, _check_voxel_size(voxel_size_a), dtype=np.float64)


def zyx_to_star_xyz(z, y, x):
    """Voxel ZYX -> RELION ``(rlnCoordinateX, Y, Z)`` in pixels: the same 0-based numbers, reordered."""
    return x, y, z


def star_xyz_to_zyx(x, y, z):
    """RELION ``(rlnCoordinateX, Y, Z)`` pixels -> voxel ``(z, y, x)``; inverse of :func:`zyx_to_star_xyz`."""
    return z, y, x


def centered_angstrom_to_zyx(xa, ya, za, shape_zyx, voxel_size_a):
    """RELION 5 centred coordinates (Angstrom from the centre) -> voxel ``(z, y, x)``.

    ``shape_zyx`` is the tomogram's ``(D, H, W)``; the centre is ``(D/2, H/2, W/2)`` as in RELION.
    """
    d, h, w = (float(n) for n in shape_zyx)
    return (angstrom_to_voxels(za, voxel_size_a) + d / 2, angstrom_to_voxels(ya, voxel_size_a) + h / 2,
            angstrom_to_voxels(xa, voxel_size_a) + w / 2)


def zyx_to_centered_angstrom(z, y, x, shape_zyx, voxel_size_a):
    """Voxel ``(z, y, x)`` -> RELION 5 ``(X, Y, Z)`` Angstrom from the centre; inverse of
    :func:`centered_angstrom_to_zyx`."""
    d, h, w = (float(n) for n in shape_zyx)
    return (voxels_to_angstrom(x - w / 2, voxel_size_a), voxels_to_angstrom(y - h / 2, voxel_size_a),
            voxels_to_angstrom(z - d / 2, voxel_size_a))


def _check_voxel_size(voxel_size_a):
    vs = np.asarray(voxel_size_a, dtype=np.float64)
    if not np.all(np.isfinite(vs) & (vs > 0)):
        raise ValueError(f"voxel_size_a must be finite and > 0 (Angstrom), got {voxel_size_a!r}")
    return vs if vs.ndim else float(vs)


# ----------------------------------------------------------------------------- pick tables

def empty_picks_table() -> pa.Table:
    """A picks table with :data:`PICK_COLUMNS` and no rows."""
    return PICKS_SCHEMA.empty_table()


def picks_table(rows: list[dict]) -> pa.Table:
    """Build a picks table from dicts (one per pick).

    Required keys: ``tomogram``, ``class`` (or ``cls``), ``z``, ``y``, ``x`` (voxels).
    Optional: ``instance_id`` (default: 1, 2, ... within each (tomogram, class)),
    ``voxel_size_a`` (NaN), ``voxel_count`` (0), ``score``, ``similarity``, ``pred_iou`` (NaN).

    Raises:
        TableError: unknown or missing keys, or values of the wrong type.
    """
    source = "<picks rows>"
    columns: dict[str, list] = {name: [] for name in PICK_COLUMNS}
    next_id: dict[tuple, int] = {}
    for i, row in enumerate(rows):
        row = dict(row)
        if "cls" in row:
            row.setdefault("class", row.pop("cls"))
        unknown = sorted(set(row) - set(PICK_COLUMNS))
        missing = [k for k in ("tomogram", "class", "z", "y", "x") if k not in row]
        if unknown or missing:
            raise TableError(source, f"row {i}: unknown keys {unknown}, missing keys {missing}; "
                                     f"expected keys from {list(PICK_COLUMNS)}")
        key = (row["tomogram"], row["class"])
        if "instance_id" not in row:
            row["instance_id"] = next_id[key] = next_id.get(key, 0) + 1
        for name in PICK_COLUMNS:
            columns[name].append(row.get(name, _OPTIONAL.get(name)))
    try:
        table = pa.table({n: pa.array(v, type=_TYPES[n]) for n, v in columns.items()})
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
        raise TableError(source, f"a value has the wrong type: {err}") from err
    return validate_picks(table, source=source)


def validate_picks(table: pa.Table, *, source: str = "<picks table>") -> pa.Table:
    """Check and cast a picks table to :data:`PICKS_SCHEMA` (column order; extra columns dropped)."""
    return _conform(table, PICK_COLUMNS, source, optional=_OPTIONAL)


def validate_truth(table: pa.Table, *, source: str = "<truth table>") -> pa.Table:
    """Check and cast a truth table: :data:`TRUTH_COLUMNS` plus ``voxel_size_a`` if present."""
    names = TRUTH_COLUMNS + (("voxel_size_a",) if "voxel_size_a" in table.column_names else ())
    out = _conform(table, names, source, optional={"voxel_size_a": math.nan})
    radius = out.column("radius").to_numpy()
    bad = np.flatnonzero(~(np.isfinite(radius) & (radius > 0)))
    if bad.size:
        raise TableError(source, f"column 'radius' (voxels) must be > 0, got {radius[bad[0]]} in row {bad[0] + 1}")
    return out


def write_picks(table: pa.Table, out_dir_or_prefix: str, *, storage_options: dict | None = None) -> list[str]:
    """Write ``picks.parquet`` and ``picks.csv`` (same columns) and return their paths.

    Args:
        table: picks table (see :func:`validate_picks`).
        out_dir_or_prefix: a directory (local or fsspec URL; files ``picks.*`` go inside), or a
            path ending in ``.parquet`` / ``.csv``, used as the prefix of both files.
    """
    table = validate_picks(table)
    base = str(out_dir_or_prefix)
    stem, ext = os.path.splitext(base)
    prefix = stem if ext.lower() in (".parquet", ".csv") else join(base, "picks")
    written = []
    for suffix, writer in ((".parquet", pq.write_table), (".csv", pacsv.write_csv)):
        buf = io.BytesIO()
        writer(table, buf)
        written.append(write_bytes_atomic(prefix + suffix, buf.getvalue(), storage_options=storage_options))
    return written


def read_picks(path: str) -> pa.Table:
    """Read a picks table (``.parquet`` or ``.csv``) and validate it; empty score cells become NaN."""
    return validate_picks(_read_table(path), source=str(path))


def read_truth(path: str) -> pa.Table:
    """Read ground truth ``tomogram,class,instance_id,z,y,x,radius[,voxel_size_a]`` (CSV or Parquet).

    ``z, y, x`` and ``radius`` are in voxels; ``voxel_size_a`` in Angstrom.
    """
    return validate_truth(_read_table(path), source=str(path))


# ----------------------------------------------------------------------------- prompts

def read_prompts(path: str, *, voxel_size_a: float | dict[str, float] | None = None,
                 default_class: str = "default",
                 shapes: dict[str, tuple[int, int, int]] | None = None,
                 storage_options: dict | None = None) -> list[Point]:
    """Read prompt points (voxels, ZYX) from CSV, RELION STAR or copick JSON.

    * ``.csv``: columns ``tomogram,z,y,x`` (voxels) and optional ``class``;
    * ``.star``: ``rlnCoordinateX/Y/Z`` (pixels of the tomogram) or RELION 5
      ``rlnCenteredCoordinate{X,Y,Z}Angst`` (needs ``shapes`` and ``voxel_size_a``); tomogram from
      ``rlnTomoName`` or ``rlnMicrographName``; class from ``rlnClassNumber``; origins ignored;
    * ``.json``: a copick picks file (locations in Angstrom; needs ``voxel_size_a`` or the file's
      ``voxel_spacing``).

    Args:
        voxel_size_a: Angstrom per voxel of the tomograms, one value or one per tomogram name.
        default_class: class of points whose file names none.
        shapes: tomogram name -> ``(D, H, W)`` voxels, for RELION 5 centred coordinates.
        storage_options: fsspec options for a remote ``path``.

    Raises:
        TableError: missing/empty file, missing columns, non-numeric coordinates, no voxel size.
    """
    path = str(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".csv", ".star", ".json"):
        raise TableError(path, f"unknown prompt format {suffix!r}; expected .csv, .star or .json")
    data = _read_bytes(path, storage_options)
    if not data.strip():
        raise TableError(path, "file is empty; expected prompt points")
    if suffix == ".csv":
        points = _csv_prompts(path, data, default_class)
    elif suffix == ".star":
        from cryosam_ray.star import read_star_prompts  # the STAR module builds on this one

        points = read_star_prompts(path, data.decode("utf-8", "replace"), voxel_size_a, shapes, default_class)
    else:
        points = _copick_prompts(path, data, voxel_size_a, default_class)
    if not points:
        raise TableError(path, "no prompt points in the file")
    log.debug("read %d prompts from %s", len(points), path)
    return points


def _csv_prompts(path: str, data: bytes, default_class: str) -> list[Point]:
    table = _parse_csv(path, data)
    _require(table.column_names, ("tomogram", "z", "y", "x"), path)
    tomos = [tomogram_stem(t) for t in _column(table, "tomogram", "str", path).to_pylist()]
    cls = (_column(table, "class", "str", path).to_pylist() if "class" in table.column_names
           else [default_class] * table.num_rows)
    zyx = [_column(table, name, "float", path).to_numpy() for name in ("z", "y", "x")]
    return [Point(t, float(z), float(y), float(x), c) for t, z, y, x, c in zip(tomos, *zyx, cls)]


def _copick_prompts(path, data, voxel_size_a, default_class) -> list[Point]:
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise TableError(path, f"not valid JSON: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise TableError(path, "expected a copick picks object with a 'points' list")
    parts = str(path).replace("\\", "/").split("/")
    run = doc.get("run_name") or (parts[-3] if len(parts) >= 3 and parts[-2] == "Picks" else None)
    if not run:
        raise TableError(path, "copick picks name no run: expected 'run_name' or an ExperimentRuns/<run>/Picks/ path")
    if not doc["points"]:
        return []
    cls = doc.get("pickable_object_name") or default_class
    vs = _voxel_size_for(run, voxel_size_a) or _positive(doc.get("voxel_spacing"))
    if vs is None:
        raise TableError(path, f"copick locations are in Angstrom but no voxel size is known for run {run!r}: "
                               "pass voxel_size_a (the file has no voxel_spacing)")
    points = []
    for i, point in enumerate(doc["points"]):
        try:
            loc = point["location"]
            xa, ya, za = float(loc["x"]), float(loc["y"]), float(loc["z"])
        except (KeyError, TypeError, ValueError) as err:
            raise TableError(path, f"point {i}: expected location {{x, y, z}} numbers (Angstrom), "
                                   f"got {point!r}") from err
        z, y, x = (float(angstrom_to_voxels(a, vs)) for a in (za, ya, xa))
        points.append(Point(str(run), z, y, x, str(cls)))
    return points


# ----------------------------------------------------------------------------- writers

def write_copick(table: pa.Table, out_dir: str, *, user_id: str = "cryosam", session_id: str = "0") -> list[str]:
    """Write picks in copick layout and return the files written.

    One file per (tomogram, class): ``out_dir/ExperimentRuns/<tomogram>/Picks/
    <user_id>_<session_id>_<class>.json``; locations in Angstrom (``voxel * voxel_size_a``),
    identity transformation, ``instance_id`` and ``score`` (null when NaN).

    Raises:
        TableError: a pick has no valid ``voxel_size_a``.
    """
    table = validate_picks(table)
    cols = {n: table.column(n).to_pylist() for n in PICK_COLUMNS}
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(cols["tomogram"], cols["class"])):
        groups.setdefault(key, []).append(i)
    written = []
    for (tomo, cls), idx in sorted(groups.items()):
        sizes = [cols["voxel_size_a"][i] for i in idx]
        if any(_positive(v) is None for v in sizes):
            raise TableError("<picks table>", f"tomogram {tomo!r} class {cls!r}: copick needs voxel_size_a > 0 "
                                              f"(Angstrom) for every pick, got {sorted(set(sizes))[:3]}")
        points = []
        for i in idx:
            z, y, x = (float(voxels_to_angstrom(cols[a][i], cols["voxel_size_a"][i])) for a in ("z", "y", "x"))
            score = cols["score"][i]
            points.append({"location": {"x": x, "y": y, "z": z}, "transformation_": _IDENTITY,
                           "instance_id": int(cols["instance_id"][i]),
                           "score": None if score is None or math.isnan(score) else score})
        doc = {"pickable_object_name": cls, "user_id": user_id, "session_id": session_id, "run_name": tomo,
               "voxel_spacing": sizes[0] if len(set(sizes)) == 1 else None, "unit": "angstrom",
               "points": points, "trust_orientation": False}
        target = join(out_dir, "ExperimentRuns", tomo, "Picks", f"{user_id}_{session_id}_{cls}.json")
        written.append(write_bytes_atomic(target, json.dumps(doc, indent=1).encode()))
    return written


# ----------------------------------------------------------------------------- helpers

def tomogram_stem(name: str) -> str:
    """Tomogram name from a path or name: ``a/TS_01.mrc:mrc`` -> ``TS_01`` (volume suffixes stripped)."""
    base = str(name).strip().rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].split(":", 1)[0]
    for suffix in _VOLUME_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _voxel_size_for(tomogram: str, voxel_size_a) -> float | None:
    if isinstance(voxel_size_a, dict):
        return _positive(voxel_size_a.get(tomogram))
    return _positive(voxel_size_a)


def _require(found, expected, path) -> None:
    missing = [name for name in expected if name not in found]
    if missing:
        raise TableError(path, f"missing columns {missing}; expected {list(expected)}, found {list(found)}")


def _read_bytes(path: str, storage_options: dict | None = None) -> bytes:
    try:
        return read_bytes(str(path), storage_options)
    except FileNotFoundError as err:
        raise TableError(path, "file not found") from err
    except OSError as err:
        raise TableError(path, f"cannot read the file: {err}") from err


def _parse_csv(path: str, data: bytes) -> pa.Table:
    """Parse CSV bytes with every column as a string (types are converted by :func:`_column`)."""
    first = data.decode("utf-8-sig", "replace").splitlines()[0]
    if not first.strip():
        raise TableError(path, "the first line is blank; expected the header line (column names)")
    header = next(csv.reader(io.StringIO(first)))
    names = [h.strip() for h in header]
    try:
        table = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
                               convert_options=pacsv.ConvertOptions(column_types={h: pa.string() for h in header}))
    except (pa.ArrowInvalid, ValueError) as err:
        raise TableError(path, f"cannot parse CSV: {err}") from err
    return table.rename_columns(names)


def _read_table(path: str) -> pa.Table:
    path = str(path)
    data = _read_bytes(path)
    if not data.strip():
        raise TableError(path, "file is empty; expected a header line")
    if path.lower().endswith((".parquet", ".pq")):
        try:
            return pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as err:
            raise TableError(path, f"not a readable Parquet file: {err}") from err
    if path.lower().endswith(".csv"):
        return _parse_csv(path, data)
    raise TableError(path, "unknown table format; expected .csv or .parquet")


def _conform(table: pa.Table, names, source: str, *, optional: dict) -> pa.Table:
    _require(table.column_names, [n for n in names if n not in optional], source)
    extra = sorted(set(table.column_names) - set(names))
    if extra:
        log.debug("%s: ignoring columns %s", source, extra)
    arrays = {}
    for name in names:
        if name not in table.column_names:
            arrays[name] = pa.array([optional[name]] * table.num_rows, type=_TYPES[name])
            continue
        kind = "str" if _TYPES[name] == pa.string() else "int" if _TYPES[name] == pa.int64() else "float"
        arrays[name] = _column(table, name, kind, source, empty=optional.get(name))
    return pa.table(arrays)


def _column(table: pa.Table, name: str, kind: str, source: str, *, empty=None) -> pa.Array:
    """Column ``name`` as string / float64 / int64; a bad value raises TableError with its row (1-based)."""
    col = table.column(name).combine_chunks()
    target = {"str": pa.string(), "float": pa.float64(), "int": pa.int64()}[kind]
    if pa.types.is_string(col.type) and kind != "str" and empty is not None:
        col = pc.if_else(pc.equal(pc.utf8_trim_whitespace(col), ""), pa.scalar(None, pa.string()), col)
    if col.null_count:
        if empty is None:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]) + 1
            raise TableError(source, f"column {name!r}: empty value in row {row}")
        col = col.fill_null(str(empty) if pa.types.is_string(col.type) else pa.scalar(empty, target))
    try:
        return pc.cast(col, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    for row, value in enumerate(col.to_pylist()):
        try:
            number = float(value)
            if kind == "int" and not number.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            what = "an integer" if kind == "int" else "a number"
            raise TableError(source, f"column {name!r}: expected {what} in row {row + 1}, got {value!r}") from None
    if kind == "int":
        return pa.array([int(float(v)) for v in col.to_pylist()], type=pa.int64())
    return pa.array([float(v) for v in col.to_pylist()], type=pa.float64())


