"""Tomogram I/O: MRC (memory-mapped locally, ranged reads remotely) and zarr / OME-Zarr.

Arrays are always ZYX (axis 0 = z, the slowest axis of an MRC file). A :class:`Tomogram` gives
slabs along any axis without loading the whole volume, its voxel size in Angstrom, and robust
normalisation statistics. Masks are written as MRC or zarr, atomically.

Every problem with an input raises a subclass of :class:`~cryosam_ray.errors.TomogramError`
that names the file.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property

import fsspec
import mrcfile
import numpy as np
from mrcfile.mrcinterpreter import MrcInterpreter
from mrcfile.utils import data_dtype_from_header, data_shape_from_header

from cryosam_ray.errors import (
    BadVoxelDataError,
    BadVoxelSizeError,
    NotAnMrcError,
    NotAVolumeError,
    TomogramNotFoundError,
)
from cryosam_ray.storage import (fingerprint, is_remote, join, local_copy, local_zarr_copy, write_file_atomic,
                                 zarr_store)

log = logging.getLogger(__name__)

MRC_SUFFIXES = (".mrc", ".rec", ".map", ".st", ".ali")
ZARR_SUFFIXES = (".zarr", ".ome.zarr")
AXES = {"z": 0, "y": 1, "x": 2}
# Bytes read per ranged request / per slab while scanning a volume: bounds driver memory.
_SCAN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class VolumeStats:
    """Robust intensity statistics of a tomogram, used to normalise its slices.

    ``mean`` and ``std`` are taken over voxels clipped to the [0.1, 99.9] percentiles, so a
    few very dense gold beads or hot pixels do not dominate them.
    """

    mean: float
    std: float
    low: float  # 0.1 percentile
    high: float  # 99.9 percentile


_COPICK_LAYOUT = re.compile(r"/ExperimentRuns/([^/]+)/VoxelSpacing[0-9.]+/[^/]+\.zarr$")


def tomogram_name(url: str) -> str:
    """The tomogram's name: the file stem without the volume suffixes (``TS_01.mrc`` -> ``TS_01``);
    for a tomogram of a copick project (``.../ExperimentRuns/<run>/VoxelSpacing<A>/<type>.zarr``)
    the copick run's name, as copick and the prompts name it."""
    copick = _COPICK_LAYOUT.search(str(url).rstrip("/"))
    if copick:
        return copick.group(1)
    name = str(url).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.zarr", *ZARR_SUFFIXES, *MRC_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class _RemoteMrcArray:
    """Read-only ZYX view of an MRC file behind fsspec, read with ranged requests.

    Only the sections (z planes) that a slab touches are fetched, in requests of at most
    ``_SCAN_BYTES``; a y or x slab therefore reads every section, one chunk at a time.
    """

    def __init__(self, fs, path: str, offset: int, shape: tuple, dtype: np.dtype):
        self.fs, self.path, self.offset = fs, path, offset
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        zkey, rest = key[0], key[1:]
        if isinstance(zkey, (int, np.integer)):
            z = int(zkey) % self.shape[0]
            return self._read_sections(z, z + 1)[(0, *rest)]
        start, stop, step = zkey.indices(self.shape[0])
        section_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        per_read = max(1, _SCAN_BYTES // section_bytes)
        parts = []
        for z0 in range(start, stop, per_read):
            z1 = min(stop, z0 + per_read)
            parts.append(self._read_sections(z0, z1)[(slice(None), *rest)])
        out = np.concatenate(parts, axis=0) if parts else np.empty((0,), self.dtype)
        return out[::step] if step != 1 else out

    def _read_sections(self, z0: int, z1: int) -> np.ndarray:
        section = self.shape[1] * self.shape[2] * self.dtype.itemsize
        begin = self.offset + z0 * section
        raw = self.fs.cat_file(self.path, start=begin, end=begin + (z1 - z0) * section)
        return np.frombuffer(raw, dtype=self.dtype).reshape(z1 - z0, *self.shape[1:])


class Tomogram:
    """A 3D tomogram, ZYX, opened lazily. Build with :func:`open_tomogram`.

    Attributes:
        url: where it was opened from (local path or fsspec URL).
        name: its id in tables and output names: the file stem, or the name it was opened with
            (a copick run's).
        shape: (D, H, W) = (nz, ny, nx).
        voxel_size_a: isotropic voxel size in Angstrom (the x spacing when anisotropic).
    """

    def __init__(self, url: str, array, voxel_size_a: float, storage_options: dict | None = None,
                 name: str | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.name = name or tomogram_name(url)
        self._array = array
        self.shape: tuple[int, int, int] = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.voxel_size_a = float(voxel_size_a)

    def __repr__(self) -> str:
        return f"Tomogram({self.name!r}, shape={self.shape}, voxel_size_a={self.voxel_size_a:g})"

    def slab(self, axis: str | int, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` along ``axis``, as float32, with that axis first.

        Returns:
            (stop - start, A, B) float32, where (A, B) are the two other axes in ZYX order:
            axis z gives (n, H, W), y gives (n, D, W), x gives (n, D, H).
        """
        ax = AXES[axis] if isinstance(axis, str) else int(axis)
        if not 0 <= start <= stop <= self.shape[ax]:
            raise IndexError(f"{self.url}: slab {start}:{stop} is outside axis {ax} of size {self.shape[ax]}")
        key = [slice(None)] * 3
        key[ax] = slice(start, stop)
        block = np.asarray(self._array[tuple(key)], dtype=np.float32)
        return np.moveaxis(block, ax, 0)

    def slice(self, axis: str | int, index: int) -> np.ndarray:
        """One 2D slice along ``axis`` (see :meth:`slab` for the axis order), float32."""
        return self.slab(axis, index, index + 1)[0]

    def read(self) -> np.ndarray:
        """The whole volume, (D, H, W) float32. Prefer :meth:`slab` for large tomograms."""
        return self.slab(0, 0, self.shape[0])

    def iter_slabs(self, max_bytes: int = _SCAN_BYTES):
        """Yield ``(z0, slab)`` over the whole volume in z slabs of about ``max_bytes``."""
        per_slab = max(1, max_bytes // (self.shape[1] * self.shape[2] * 4))
        for z0 in range(0, self.shape[0], per_slab):
            yield z0, self.slab(0, z0, min(self.shape[0], z0 + per_slab))

    @cached_property
    def stats(self) -> VolumeStats:
        """Robust statistics over the whole volume, read slab by slab.

        Raises:
            BadVoxelDataError: NaN or infinite voxels, or constant data.
        """
        rng = np.random.default_rng(0)
        samples, vmin, vmax = [], math.inf, -math.inf
        total = self.shape[0] * self.shape[1] * self.shape[2]
        keep = min(1.0, 2_000_000 / total)  # percentiles from a 2 M voxel sample
        for z0, slab in self.iter_slabs():
            finite = np.isfinite(slab)
            if not finite.all():
                bad = np.argwhere(~finite)[0]
                raise BadVoxelDataError(
                    self.url, f"voxel (z={z0 + bad[0]}, y={bad[1]}, x={bad[2]}) is {slab[tuple(bad)]}; "
                    "expected finite values everywhere")
            vmin, vmax = min(vmin, float(slab.min())), max(vmax, float(slab.max()))
            flat = slab.ravel()
            samples.append(flat if keep >= 1 else flat[rng.random(flat.size) < keep])
        if vmax - vmin <= 0:
            raise BadVoxelDataError(self.url, f"every voxel equals {vmin}; expected varying densities")
        sample = np.concatenate(samples).astype(np.float64)
        low, high = np.percentile(sample, [0.1, 99.9])
        clipped = np.clip(sample, low, high)
        std = float(clipped.std())
        if std <= 0:  # almost constant: fall back to the unclipped spread
            std = float(sample.std())
        return VolumeStats(mean=float(clipped.mean()), std=std, low=float(low), high=float(high))

    def normalize(self, block: np.ndarray, *, clip_sigma: float = 5.0) -> np.ndarray:
        """``block`` standardised with this tomogram's robust mean / std, clipped at +-clip_sigma."""
        s = self.stats
        out = (np.asarray(block, dtype=np.float32) - s.mean) / s.std
        return np.clip(out, -clip_sigma, clip_sigma, out=out)


def data_fingerprint(tomogram: "Tomogram") -> dict:
    """What identifies a tomogram's data for cache keys: its file (URL, size, stamp), geometry and
    intensity statistics (computed if needed: one full read)."""
    try:
        stored = fingerprint(tomogram.url, tomogram.storage_options)
    except (OSError, ValueError, TypeError):  # a zarr folder has no single size or stamp
        stored = {"url": tomogram.url, "size": None, "stamp": None}
    stats = tomogram.stats
    return {**stored, "shape": list(tomogram.shape), "dtype": str(tomogram.dtype),
            "voxel_size_a": round(float(tomogram.voxel_size_a), 6), "mean": round(float(stats.mean), 6),
            "std": round(float(stats.std), 6)}


def open_tomogram(url: str | os.PathLike, *, voxel_size_a: float | None = None,
                  storage_options: dict | None = None, cache_dir: str | None = None,
                  name: str | None = None) -> Tomogram:
    """Open an MRC file or a zarr / OME-Zarr array as a lazy ZYX :class:`Tomogram`.

    Args:
        url: local path or fsspec URL (``s3://bucket/TS_01.mrc``, ``/data/TS_01.zarr``).
        voxel_size_a: overrides the voxel size in the file (Angstrom).
        storage_options: passed to fsspec (credentials, endpoint); default from the environment.
        cache_dir: with a remote MRC file, read it from a local copy kept here (see
            :func:`cryosam_ray.storage.local_copy`); with a zarr array (local or remote), from a
            decompressed copy (:func:`cryosam_ray.storage.local_zarr_copy`); None: read in place.
        name: the tomogram's name (default: the file stem, :func:`tomogram_name`).

    Raises:
        TomogramNotFoundError: nothing at ``url``.
        NotAnMrcError: not a readable MRC or zarr volume.
        NotAVolumeError: not 3D (a 2D image, a single section, a 4D stack).
        BadVoxelSizeError: voxel size 0, negative or not finite (and no override).
    """
    url = str(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        raise TomogramNotFoundError(url, "no such file or directory")
    zarr_input = _looks_like_zarr(fs, path)
    if zarr_input:
        array, header_voxel = _open_zarr(url, fs, path)
    elif cache_dir and is_remote(url):
        local = local_copy(url, cache_dir, storage_options)
        array, header_voxel = _open_mrc(url, *fsspec.core.url_to_fs(local), local=True)
    else:
        array, header_voxel = _open_mrc(url, fs, path)
    if np.dtype(array.dtype).kind not in "iuf":
        raise NotAVolumeError(url, f"voxels are {np.dtype(array.dtype)}; expected real numbers (integer or float "
                              "density). A complex map (MRC mode 3 or 4) is a Fourier transform, not a tomogram")
    if len(array.shape) != 3 or min(array.shape) < 2:
        raise NotAVolumeError(url, f"expected a 3D volume (D, H, W) with every side >= 2, got shape "
                              f"{tuple(array.shape)}; a 2D image or single section cannot be segmented in 3D")
    voxel = header_voxel if voxel_size_a is None else float(voxel_size_a)
    if voxel is None or not math.isfinite(voxel) or voxel <= 0:
        raise BadVoxelSizeError(url, f"voxel size is {voxel!r} Angstrom; expected a positive number. "
                                "Fix the header or pass voxel_size_a (--voxel-size)")
    if zarr_input and cache_dir:
        array = local_zarr_copy(url, array, cache_dir, storage_options)
    return Tomogram(url, array, voxel, storage_options, name)


def _looks_like_zarr(fs, path: str) -> bool:
    if path.rstrip("/").lower().endswith(ZARR_SUFFIXES):
        return True
    return fs.isdir(path) and any(fs.exists(join(path, m)) for m in (".zarray", ".zgroup", "zarr.json"))


def _open_mrc(url: str, fs, path: str, *, local: bool = False):
    """Returns (ZYX array-like, voxel size from the header or None); ``local``: ``path`` is a
    local copy of ``url``."""
    try:
        if local or not is_remote(url):
            mrc = mrcfile.mmap(path, mode="r", permissive=False)
            array, voxel = mrc.data, mrc.voxel_size
        else:
            array, voxel = _open_remote_mrc(fs, path)
    except (ValueError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise TomogramNotFoundError(url, str(exc)) from exc
        raise NotAnMrcError(url, f"not a readable MRC file ({exc})") from exc
    if array is None:
        raise NotAnMrcError(url, "MRC header describes no data")
    x_spacing = float(voxel.x)
    if not all(math.isclose(float(v), x_spacing, rel_tol=1e-3) for v in (voxel.y, voxel.z)):
        log.warning("%s: anisotropic voxel size %s; using x = %g A", url, voxel, x_spacing)
    return array, x_spacing


def _open_remote_mrc(fs, path: str):
    head = fs.cat_file(path, start=0, end=1024)
    interp = MrcInterpreter(iostream=io.BytesIO(head), permissive=False, header_only=True)
    header = interp.header
    ext = int(header.nsymbt)
    if ext:
        interp = MrcInterpreter(iostream=io.BytesIO(fs.cat_file(path, start=0, end=1024 + ext)),
                                permissive=False, header_only=True)
    shape = data_shape_from_header(header)
    dtype = data_dtype_from_header(header)
    if len(shape) == 2:
        shape = (1, *shape)
    size = fs.size(path)
    need = 1024 + ext + int(np.prod(shape)) * dtype.itemsize
    if size < need:
        raise ValueError(f"file is {size} bytes, header promises {need}")
    return _RemoteMrcArray(fs, path, 1024 + ext, shape, dtype), interp.voxel_size


def _open_zarr(url: str, fs, path: str):
    """Open a zarr array, or an OME-Zarr group's full-resolution level, with its voxel size."""
    import zarr

    try:
        node = zarr.open(store=fsspec.FSMap(path, fs) if is_remote(url) else path, mode="r")
    except Exception as exc:  # zarr raises many types for a broken store
        raise NotAnMrcError(url, f"not a readable zarr array or OME-Zarr group ({type(exc).__name__}: {exc})") from exc
    attrs = dict(node.attrs)
    if isinstance(node, zarr.Array):
        return node, _zarr_voxel_size(attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise NotAnMrcError(url, "zarr group without OME-Zarr 'multiscales' metadata; expected an array "
                            "or an OME-Zarr image")
    ms = multiscales[0]
    level = ms["datasets"][0]
    array = node[level["path"]]
    voxel = None
    for transform in level.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            voxel = float(transform["scale"][-1])
    unit = next((a.get("unit") for a in reversed(ms.get("axes", [])) if isinstance(a, dict)), "angstrom")
    factor = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4}.get(unit or "angstrom")
    if factor is None:
        raise NotAnMrcError(url, f"OME-Zarr axis unit {unit!r} is not one of angstrom, nanometer, micrometer")
    return array, None if voxel is None else voxel * factor


def _zarr_voxel_size(attrs: dict) -> float | None:
    for key in ("voxel_size_a", "voxel_size", "pixel_size"):
        if key in attrs:
            value = attrs[key]
            return float(value[-1] if isinstance(value, (list, tuple)) else value)
    return None


def write_mrc(url: str | os.PathLike, volume: np.ndarray, voxel_size_a: float, *,
              storage_options: dict | None = None) -> str:
    """Write a ZYX volume as MRC, atomically (temporary file then rename / single upload).

    Integer labels are stored as uint16 when they fit (MRC mode 6) and as float32 otherwise
    (exact up to 2**24); MRC has no 32-bit integer mode. Returns the URL written.
    """
    url = str(url)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"write_mrc({url}): expected a 3D ZYX array, got shape {volume.shape}")
    volume = _mrc_compatible(volume)
    return write_file_atomic(url, lambda local: _write_local_mrc(local, volume, voxel_size_a),
                             storage_options=storage_options)


def write_labels_mrc(url: str | os.PathLike, shape: tuple[int, int, int], masks, voxel_size_a: float, *,
                     dtype=np.uint16, storage_options: dict | None = None) -> str:
    """Write a (D, H, W) label volume as MRC from its pieces, never holding it whole in memory.

    Args:
        masks: (bbox, mask, label) triples: bbox (z0, y0, x0, z1, y1, x1), a bool mask of the
            box's shape, the label (> 0) written where the mask is set and no earlier label is.
        dtype: uint16 (MRC mode 6), int16 (mode 1) or float32 (mode 2, labels up to 2**24).

    The file is filled through a memory map (pages go to disk, not to this process's heap),
    then put at ``url`` atomically. Returns ``url``.
    """
    mode = {np.dtype(np.uint16): 6, np.dtype(np.int16): 1, np.dtype(np.float32): 2}[np.dtype(dtype)]

    def fill(local: str) -> None:
        with mrcfile.new_mmap(local, tuple(int(s) for s in shape), mrc_mode=mode, overwrite=True) as mrc:
            for (z0, y0, x0, z1, y1, x1), mask, label in masks:
                view = mrc.data[z0:z1, y0:y1, x0:x1]
                view[mask & (view == 0)] = label
            mrc.voxel_size = float(voxel_size_a)
            _update_header_stats_by_slab(mrc)

    return write_file_atomic(str(url), fill, storage_options=storage_options)


def _update_header_stats_by_slab(mrc, slab_voxels: int = 2**24) -> None:
    """``mrc.update_header_stats()`` (min, max, mean, RMS deviation) a slab at a time: mrcfile's
    own takes a float64 copy of the whole volume (4 GiB for 500 x 1024 x 1024 labels)."""
    data = mrc.data
    step = max(1, slab_voxels // max(1, data.shape[1] * data.shape[2]))
    low, high, total, squares = math.inf, -math.inf, 0.0, 0.0
    for z0 in range(0, data.shape[0], step):
        slab = np.asarray(data[z0:z0 + step], np.float64)
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
        total += float(slab.sum())
        squares += float(np.square(slab).sum())
    n = max(1, data.size)
    mean = total / n
    mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = low, high, mean
    mrc.header.rms = math.sqrt(max(squares / n - mean * mean, 0.0))


def _mrc_compatible(volume: np.ndarray) -> np.ndarray:
    if volume.dtype == np.bool_:
        return volume.astype(np.int8)
    if volume.dtype.kind in "iu" and volume.dtype not in (np.int8, np.int16, np.uint16):
        if volume.size == 0 or (volume.min() >= 0 and volume.max() < 2**16):
            return volume.astype(np.uint16)
        return volume.astype(np.float32)
    if volume.dtype == np.float64:
        return volume.astype(np.float32)
    return volume


def _write_local_mrc(path: str, volume: np.ndarray, voxel_size_a: float) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume))
        mrc.voxel_size = float(voxel_size_a)
        mrc.update_header_stats()


def read_mrc(url: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a whole MRC volume (local or remote): returns (ZYX array in its stored dtype, voxel size A)."""
    tomo = open_tomogram(url)
    return np.asarray(tomo._array[:]), tomo.voxel_size_a


def write_zarr(url: str | os.PathLike, volume: np.ndarray, voxel_size_a: float, *,
               chunks: tuple[int, int, int] = (64, 64, 64)) -> str:
    """Write a ZYX volume as a zarr array with ``voxel_size_a`` in its attributes. Returns the URL."""
    import zarr

    url = str(url)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"write_zarr({url}): expected a 3D ZYX array, got shape {volume.shape}")
    chunks = tuple(min(c, max(1, s)) for c, s in zip(chunks, volume.shape))
    array = zarr.open_array(store=zarr_store(url), mode="w", shape=volume.shape, dtype=volume.dtype,
                            chunks=chunks)  # the same call on zarr 2 and 3
    array[:] = volume
    array.attrs["voxel_size_a"] = float(voxel_size_a)
    return url
