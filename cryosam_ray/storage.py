"""Where the package's bytes live: fsspec URLs (a plain path, ``file://`` or ``s3://``).

One place for what every stage needs from storage, so that each does it the same way:

* :func:`join`: URLs built from a base and parts (never by hand in the stages);
* :func:`write_bytes_atomic` / :func:`write_file_atomic`: a reader never sees half a file
  (local: temporary file then ``os.replace``; object stores: one upload, atomic by nature);
* :func:`fingerprint`: what identifies an input without reading it (resume);
* :func:`open_group` and :class:`DoneFlags`: zarr groups on any fsspec storage, and the
  per-unit "done" flags that the feature and embedding stores set after their data, so a
  worker killed mid-write leaves work that is simply done again.

Every function takes the run's ``io.storage_options`` (credentials, endpoint, ``anon``),
passed to fsspec for remote URLs.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import fsspec
import numpy as np


def is_remote(url: str) -> bool:
    """True for URLs with a non-file protocol (``s3://``, ``gs://``, ``http://`` ...)."""
    return fsspec.utils.get_protocol(str(url)) not in ("file", "local")


def join(base: str, *parts: str) -> str:
    """``base/part/part``: one slash between parts, whatever the base ends with."""
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for ``url``."""
    return fsspec.core.url_to_fs(str(url), **(storage_options or {}) if is_remote(url) else {})


def transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: a dropped connection, a timeout, throttling (503
    SlowDown) or a server error; not a missing object or a refused permission."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(key in text for key in ("SlowDown", "503", "500 ", "InternalError", "ServiceUnavailable",
                                       "RequestTimeout", "Throttl", "Connection reset", "EndpointConnectionError"))


_BACKENDS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "fsspec")


def reach_error(exc: BaseException) -> str | None:
    """What went wrong reaching a store, said for a user, when ``exc`` is a storage error (an
    OSError, or one of the backends' own: botocore's credential and endpoint errors are not
    OSErrors); None for any other error."""
    if type(exc).__name__ == "NoCredentialsError":
        return ("no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or "
                "io.storage_options: {anon: true} for a public bucket")
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _BACKENDS:
        return f"{type(exc).__name__}: {exc}"
    return None


def retried(op: Callable, url: str, *, attempts: int = 5, backoff_s: float = 0.5):
    """``op()``, retried with exponential backoff while it fails transiently (see :func:`transient`).

    Raises the last error; a storage error (see :func:`reach_error`) as an OSError naming the URL.
    """
    for attempt in range(attempts):
        try:
            return op()
        except Exception as exc:  # noqa: BLE001 (classified just below)
            if not transient(exc) or attempt == attempts - 1:
                reason = reach_error(exc)
                if reason and not (isinstance(exc, OSError) and str(url) in str(exc)):
                    raise OSError(f"{url}: {reason}") from exc
                raise
            time.sleep(backoff_s * 2**attempt)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """The whole file at ``url`` (FileNotFoundError when there is none; transient errors retried)."""
    fs, path = filesystem(url, storage_options)

    def read() -> bytes:
        with fs.open(path, "rb") as handle:
            return handle.read()

    try:
        return retried(read, url) if is_remote(url) else read()
    except OSError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise exc.__cause__
        raise


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes, *, storage_options: dict | None = None) -> str:
    """Write ``data`` to ``url`` so that no reader sees a partial file. Returns ``url``."""
    return write_file_atomic(url, lambda local: _write_local(local, data), storage_options=storage_options)


def write_file_atomic(url: str, write: Callable[[str], None], *, storage_options: dict | None = None) -> str:
    """Let ``write(local_path)`` make the file, then put it at ``url`` atomically. Returns ``url``.

    Local: in a hidden temporary file beside the target, renamed over it (parents created).
    Remote: in a temporary folder, then one upload.
    """
    url = str(url)
    fs, path = filesystem(url, storage_options)
    if is_remote(url):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            write(local)
            retried(lambda: fs.put_file(local, path), url)  # one upload, retried when the network hiccups
        return url
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: colleagues on a shared disk could not read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return url


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set back at once
    os.umask(mask)
    return mask


def _write_local(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def remove(urls, storage_options: dict | None = None) -> None:
    """Delete what exists of ``urls`` (files or folders); for cleaning up after a failed write."""
    for url in urls:
        fs, path = filesystem(url, storage_options)
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except OSError:
            pass  # best effort: the failure that led here is what gets reported


def fingerprint(url: str, storage_options: dict | None = None) -> dict:
    """What identifies an input file without reading it: its URL, size and modification stamp."""
    fs, path = filesystem(url, storage_options)
    if is_remote(url):
        fs.invalidate_cache(path)  # s3fs keeps listings: a file replaced in this process would look unchanged
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
    # An object store's ETag changes with the content even within the stamp's one-second resolution.
    return {"url": str(url), "size": info.get("size"), "stamp": str(stamp), "etag": str(info.get("ETag", ""))}


_ZARR_METADATA = (".zgroup", ".zattrs", ".zarray", "zarr.json")


def zarr_fingerprint(url: str, storage_options: dict | None = None) -> dict:
    """What identifies a zarr group or array without reading its chunks: its URL and the size and
    stamp of its metadata files, at the top and one level down (an OME-Zarr's scale levels).

    A folder's own stamp does not do: an object store has none, and a local one changes only when
    entries are added or removed. Rewriting a volume (copick's ``from_numpy``) rewrites these files;
    chunks rewritten in place, or identical metadata rewritten within the same second on S3 (whose
    stamps have that resolution), go unseen.
    """
    fs, path = filesystem(url, storage_options)
    path = path.rstrip("/")
    if is_remote(url):
        fs.invalidate_cache(path)
    folders = [path] + sorted(p.rstrip("/") for p in fs.ls(path, detail=False) if fs.isdir(p))
    files = {}
    for folder in folders:
        for name in _ZARR_METADATA:
            try:
                info = fs.info(f"{folder}/{name}")
            except FileNotFoundError:
                continue
            stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
            files[f"{folder[len(path):]}/{name}".lstrip("/")] = [info.get("size"), str(stamp),
                                                                 str(info.get("ETag", ""))]
    return {"url": str(url), "metadata": files}


def local_copy(url: str, cache_dir: str, storage_options: dict | None = None) -> str:
    """A local copy of the remote file ``url`` in ``cache_dir``, downloaded once per version.

    Workers read a tomogram's slabs along every axis; from an MRC on S3 each y or x slab needs
    ranges from every z section, so slab by slab the file would be read many times over. One
    streamed download, then memory-mapped reads, costs one pass. The copy is keyed by the URL,
    size and modification stamp (a changed file is fetched again) and written atomically, so
    concurrent workers on one node share it.
    """
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(fingerprint(url, storage_options), sort_keys=True).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, f"{key}-{os.path.basename(filesystem(url)[1])}")
    if os.path.exists(target):
        return target
    fs, path = filesystem(url, storage_options)
    return write_file_atomic(target, lambda local: retried(lambda: fs.get_file(path, local), url))


def local_zarr_copy(url: str, array, cache_dir: str, storage_options: dict | None = None) -> np.ndarray:
    """A decompressed, memory-mapped local copy (``.npy``) of the zarr array ``array`` found at ``url``.

    zarr decodes a whole chunk for any voxel of it: a slice of a tomogram in copick's 256^3 chunks
    decodes 64 MB per chunk it crosses, and propagation reads slices one by one, many times. One
    pass, each chunk decoded once, then memory-mapped reads. The copy is keyed by the URL and its
    metadata (:func:`zarr_fingerprint`) and written atomically, so workers on one node share it.
    """
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(zarr_fingerprint(url, storage_options), sort_keys=True).encode()).hexdigest()
    name = os.path.basename(filesystem(url)[1].rstrip("/"))
    target = os.path.join(cache_dir, f"{key[:16]}-{name}.npy")
    if not os.path.exists(target):
        def write(local: str) -> None:
            out = np.lib.format.open_memmap(local, mode="w+", dtype=array.dtype, shape=tuple(array.shape))
            cz, cy = (int(c) for c in getattr(array, "chunks", array.shape)[:2])
            for z0 in range(0, out.shape[0], cz):  # one row of chunks at a time: each decoded once
                for y0 in range(0, out.shape[1], cy):
                    out[z0:z0 + cz, y0:y0 + cy] = retried(lambda: array[z0:z0 + cz, y0:y0 + cy], url)
            out.flush()
            del out

        write_file_atomic(target, write)
    return np.load(target, mmap_mode="r")


# zarr 2 and zarr 3 both work (copick's stack pins zarr 2): every zarr call of the package that
# differs between them goes through the few functions below.

def zarr_major() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


def zarr_store(url: str, storage_options: dict | None = None):
    """What ``zarr.open_group`` takes for ``url``: a local path, or an fsspec store for remote URLs."""
    if not is_remote(url):
        return filesystem(url)[1]
    if zarr_major() < 3:
        return fsspec.get_mapper(str(url), **(storage_options or {}))
    import zarr

    return zarr.storage.FsspecStore.from_url(str(url), storage_options=storage_options or {})


def open_group(url: str, mode: str = "a", storage_options: dict | None = None, *, zarr_format: int | None = None):
    """The zarr group at ``url`` (``mode``: "r", "r+", "a" or "w"); a concurrent creator is tolerated.

    ``zarr_format``: 2 or 3 for a new group under zarr 3 (zarr 2 writes only format 2).
    """
    import zarr

    extra = {"zarr_format": zarr_format} if zarr_format and zarr_major() >= 3 else {}
    return retry_on_race(lambda: zarr.open_group(store=zarr_store(url, storage_options), mode=mode, **extra))


def create_array(group, name: str, *, shape, dtype, chunks, fill_value=0, overwrite: bool = False,
                 nested: bool = False):
    """A new array ``name`` in ``group`` (replacing one with ``overwrite``). ``nested``: chunk keys
    ``z/y/x`` rather than ``z.y.x`` in a format 2 group (what OME-NGFF 0.4 and copick read)."""
    if hasattr(group, "create_array"):  # zarr 3
        extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if nested else {}
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value,
                                  overwrite=overwrite, **extra)
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value,
                                overwrite=overwrite, **({"dimension_separator": "/"} if nested else {}))


def require_array(group, name: str, *, shape, dtype, chunks, fill_value=0):
    """Array ``name`` of ``group``, created when absent (idempotent across workers)."""
    if hasattr(group, "require_array"):  # zarr 3
        make = lambda: group.require_array(name, shape=shape, dtype=dtype, chunks=chunks,  # noqa: E731
                                           fill_value=fill_value)
    else:
        make = lambda: group.require_dataset(name, shape=shape, dtype=dtype, chunks=chunks,  # noqa: E731
                                             fill_value=fill_value, exact=False)
    return retry_on_race(make)


def retry_on_race(create):
    """Run ``create`` (an open-or-create of a zarr node); once more if another worker created it meanwhile."""
    import zarr.errors

    try:
        return create()
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
        return create()


class DoneFlags:
    """One bool per unit of work (a shard, a slice) in a zarr group, one chunk per flag.

    A unit counts as done only once its flag is set, and its writer sets the flag after the
    data, so a worker killed mid-write leaves the unit to be done again. One chunk per flag lets
    several workers set flags of one array at once.
    """

    def __init__(self, array):
        self.array = array

    @classmethod
    def create(cls, group, name: str, count: int, *, reset: bool) -> "DoneFlags":
        """The flags ``name`` in ``group`` (``count`` of them); ``reset`` clears existing ones."""
        if reset:
            array = create_array(group, name, shape=(count,), dtype=bool, chunks=(1,), fill_value=False,
                                 overwrite=True)
        else:
            array = require_array(group, name, shape=(count,), dtype=bool, chunks=(1,), fill_value=False)
        return cls(array)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def all(self) -> np.ndarray:
        """(count,) bool."""
        return np.asarray(self.array[:], dtype=bool)

    def get(self, indices) -> np.ndarray:
        """Flags of ``indices`` (any int sequence), as bool."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size == 0:
            return np.zeros(0, dtype=bool)
        return np.asarray(self.array.get_orthogonal_selection((idx,)), dtype=bool)

    def set(self, indices) -> None:
        """Mark ``indices`` done (call after their data is written)."""
        idx = np.asarray(sorted({int(i) for i in indices}), dtype=np.int64)
        if idx.size:
            self.array.set_orthogonal_selection((idx,), np.ones(idx.size, dtype=bool))
