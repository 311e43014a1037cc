"""Model weights from where the user says they are: a local path, an fsspec URL or http(s).

:func:`resolve_weights` turns a weight source into a local path. A local file or folder is
used in place; a remote one (``s3://bucket/sam_vit_h.pth``, ``gs://...``, ``https://...``) is
downloaded once into a cache folder named by a hash of the URL, atomically (a temporary copy
renamed into place), so a crashed or concurrent download never leaves a half-written file
where a later run would trust it. Nothing is fetched unless the user named that source.

Cache layout: ``<cache_dir>/<sha256(url)[:16]>/<basename of the url>`` (a file, or a folder
for a remote folder such as a Hugging Face model directory).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import fsspec

from cryosam_ray.errors import WeightsError

log = logging.getLogger(__name__)

CACHE_ENV = "CRYOSAM_CACHE"
_HTTP_TIMEOUT_S = 60.0
_COPY_BUFFER = 8 * 2**20


def default_cache_dir() -> Path:
    """``$CRYOSAM_CACHE`` if set, else ``~/.cache/cryosam_ray/weights``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cryosam_ray" / "weights"


def cache_path(source: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`resolve_weights` keeps (or will keep) the copy of a remote ``source``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    return root / digest / _basename(source)


def resolve_weights(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    storage_options: dict | None = None) -> Path:
    """A local path holding the weights named by ``source``, downloading them once if remote.

    Args:
        source: a local path (or ``file://`` URL), an fsspec URL (``s3://bucket/key``; a file or
            a folder, fetched recursively) or an ``http(s)://`` URL (a single file).
        cache_dir: where remote weights are kept; default ``$CRYOSAM_CACHE`` or
            ``~/.cache/cryosam_ray/weights``.
        storage_options: passed to fsspec for remote sources (credentials, endpoint); default
            from the environment.

    Returns:
        The local file or folder. A second call with the same remote source returns the cached
        copy without touching the network.

    Raises:
        WeightsError: the local path does not exist, or the remote source cannot be fetched
            (not found, unreachable, no credentials); the error names ``source``.
    """
    source = str(source)
    protocol = fsspec.utils.get_protocol(source)
    if protocol in ("file", "local"):
        path = Path(fsspec.utils.stringify_path(source.removeprefix("file://"))).expanduser()
        if not path.exists():
            raise WeightsError(source, "no such file or directory; expected a local checkpoint file or folder "
                               "(or an s3:// or http(s):// URL)")
        return path
    target = cache_path(source, cache_dir=cache_dir)
    if target.exists():
        log.debug("weights %s found in cache at %s", source, target)
        return target
    log.info("downloading weights %s to %s", source, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            partial = Path(tmp) / target.name
            if protocol in ("http", "https"):
                _fetch_http(source, partial)
            else:
                _fetch_fsspec(source, partial, storage_options or {})
            try:
                os.replace(partial, target)
            except OSError:
                if not target.exists():  # a concurrent download that won the race is as good as ours
                    raise
    except OSError as exc:
        raise WeightsError(source, f"cannot write the weights cache at {target.parent} ({exc}); "
                           f"set cache_dir or ${CACHE_ENV}") from exc
    return target


def _basename(source: str) -> str:
    path = urllib.parse.urlsplit(source).path if "://" in source else source
    name = urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])
    return name or "weights"


def _fetch_http(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` with urllib (single file)."""
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, _COPY_BUFFER)
    except urllib.error.HTTPError as exc:
        raise WeightsError(url, f"HTTP {exc.code} {exc.reason}; expected a downloadable checkpoint") from exc
    except urllib.error.URLError as exc:
        raise WeightsError(url, f"cannot reach the server ({exc.reason})") from exc
    except (OSError, ValueError) as exc:  # connection reset, timeout, malformed URL
        raise WeightsError(url, f"download failed ({type(exc).__name__}: {exc})") from exc


def _fetch_fsspec(url: str, dest: Path, storage_options: dict) -> None:
    """Download a file, or a folder recursively, from an fsspec URL to ``dest``."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        if fs.isdir(path):
            files = [f for f in fs.find(path) if not fs.isdir(f)]
            if not files:
                raise WeightsError(url, "the folder is empty; expected checkpoint files")
            root = path.rstrip("/")
            for remote in files:
                local = dest / os.path.relpath(remote, root)
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
        elif fs.isfile(path):
            fs.get_file(path, str(dest))
        else:
            raise WeightsError(url, "no such file or folder")
    except WeightsError:
        raise
    except FileNotFoundError as exc:
        raise WeightsError(url, f"no such file or folder ({exc})") from exc
    except PermissionError as exc:
        raise WeightsError(url, f"access denied; check the credentials ({exc})") from exc
    except ImportError as exc:
        raise WeightsError(url, f"no filesystem for this URL's protocol is installed ({exc})") from exc
    except Exception as exc:  # botocore / gcsfs / network errors have no common base class
        raise WeightsError(url, f"download failed ({type(exc).__name__}: {exc})") from exc


def file_fingerprint(path: str | os.PathLike, *, head_bytes: int = 2**20) -> str:
    """A short content id of a local weights file or folder: size and sha256 of the first MiB.

    Independent of the path and the modification time, so the same checkpoint copied to every
    node of a cluster (or downloaded into different caches) has the same fingerprint.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(head_bytes))
    return digest.hexdigest()[:32]
