"""Model weights from where the user says they are: a local path, an fsspec URL or http(s).

:func:`resolve_weights` turns a weight source into a local path. A local file or folder is
used in place; a remote one (``s3://bucket/sam_vit_h.pth``, ``gs://...``, ``https://...``) is
downloaded once into a cache folder named by a hash of the URL, atomically (a temporary copy
renamed into place), so a crashed or concurrent download never leaves a half-written file
where a later run would trust it. Nothing is fetched unless the user named that source.

Cache layout: ``<cache_dir>/<sha256(url)[:16]>/<basename of the url>`` (a file, or a folder
for a remote folder such as a Hugging Face model directory).

How loaded weights run, shared by the SAM and DINOv2 backends: :func:`resolve_precision` turns
a ``precision`` setting (``auto``, ``fp32``, ``bf16``, ``fp16``) into a :class:`Precision` for a
device; :func:`to_device` moves a batch through pinned memory; :func:`batch_memory_guard` turns
a CUDA out-of-memory error in a batch loop into a :class:`~cryosam_ray.errors.ConfigError`
naming the setting to lower.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from cryosam_ray.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    import torch

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


def check_source(source: str, storage_options: dict | None = None) -> None:
    """Fail early, before any work, when named weights are plainly not there.

    Local paths must exist; ``s3://`` and other fsspec URLs are looked up; http(s) URLs and hub
    ids are left to the loader (checking them needs the network).

    Raises:
        WeightsError: names the source and what is missing.
    """
    source = str(source)
    protocol = fsspec.utils.get_protocol(source) if "://" in source else "file"
    if protocol in ("http", "https"):
        return
    if protocol == "file":
        if not Path(os.path.expanduser(source)).exists():
            raise WeightsError(source, "no such file or folder")
        return
    try:
        fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
        found = fs.exists(path)
    except Exception as exc:  # botocore / network errors have no common base class
        raise WeightsError(source, f"cannot look it up ({type(exc).__name__}: {exc})") from exc
    if not found:
        raise WeightsError(source, "no such file or folder")


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


# ---- how loaded weights run: precision, transfers, memory -------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How a model's forward pass runs on one device, resolved from a ``precision`` setting.

    Attributes:
        name: "fp32", "bf16" or "fp16".
        weights: the weights' dtype: float32, except float16 for "fp16" (pure half precision).
        autocast: the dtype of the ``torch.autocast`` region around the forward pass (bfloat16
            for "bf16": matrix products in bf16, normalisation, softmax and the residual stream
            in float32); None: no autocast.
    """

    name: str
    weights: "torch.dtype"
    autocast: "torch.dtype | None"

    def context(self, device: "torch.device") -> contextlib.AbstractContextManager:
        """The autocast region for a forward pass on ``device`` (a no-op without autocast)."""
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def native_bf16(device: "torch.device") -> bool:
    """Whether ``device`` computes bfloat16 natively: CPUs (through autocast) and CUDA GPUs of
    compute capability 8.0 or newer (A100, H100, L4, RTX 30xx ...); older GPUs only emulate it."""
    import torch

    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: "torch.device", *, setting: str) -> Precision:
    """The :class:`Precision` a ``precision`` setting means on ``device``.

    Args:
        precision: "auto" (the fastest numerically safe choice: "bf16" on a CUDA GPU with native
            bfloat16, else "fp32"; never "fp16", which must be asked for), "fp32", "bf16" or "fp16".
        device: where the model runs.
        setting: the config key, for error messages (``"segmenter.sam.precision"``).

    Raises:
        ConfigError: an unknown value, or "bf16" on a CUDA GPU without native bfloat16.
    """
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"{setting}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        what = str(device)
        if device.type == "cuda":
            what += " (compute capability {}.{}; needs 8.0 or newer)".format(*torch.cuda.get_device_capability(device))
        raise ConfigError(f"{setting}=bf16: {what} has no native bfloat16; use fp32, or fp16 (unsafe for SAM ViT-H "
                          "activations)")
    if precision == "fp16":
        return Precision("fp16", torch.float16, None)
    if precision == "bf16":
        return Precision("bf16", torch.float32, torch.bfloat16)
    return Precision("fp32", torch.float32, None)


def to_device(array: np.ndarray, device: "torch.device") -> "torch.Tensor":
    """A numpy array as a tensor on ``device``. On CUDA through pinned (page-locked) memory with a
    non-blocking copy, so the transfer is queued behind the GPU's work instead of stalling the
    host; on the CPU the array's memory is shared, not copied."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def batch_memory_guard(setting: str, batch_size: int, device: "torch.device"):
    """Run one batch; a CUDA out-of-memory error becomes a :class:`ConfigError` naming ``setting``.

    Raises:
        ConfigError: the batch did not fit in the GPU's memory; the message names the setting
            to lower, its value and the device's memory.
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        detail: list[Any] = []
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            held = torch.cuda.memory_reserved(device)
            detail = [f" ({total / 2**30:.1f} GiB, {held / 2**30:.1f} GiB held by this process)"]
        raise ConfigError(f"{setting}={batch_size}: a batch does not fit in the memory of {device}"
                          f"{''.join(detail)}; lower {setting} (for example to {max(1, batch_size // 2)}), or "
                          "share the GPU with fewer actors") from exc
