"""One run at a time per output folder: a lease object ``OUT/.cryosam.lock``.

Two runs on one ``--out`` (two nightly jobs overlapping, a retry while the first still runs)
would duplicate work and race on ``run.json``. A run takes the lease before it plans and gives
it back when it ends; while it runs, a background thread renews it. The lease is a small JSON
object (owner, host, pid, run id, expiry) that works the same on a local disk and on S3, where
there is no file locking: a lease whose expiry has passed (its run was killed) may be taken
over, and so may the lease of a process of this machine that no longer runs (a killed driver's
rerun need not wait). A second run refuses with the owner's name, or waits (``wait=True``).

Taking the lease: locally the file is created exclusively (``O_EXCL``); on object stores it is
written and read back after a short pause, and the run goes on only if it still names this run
(the last writer wins, the other sees it lost).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from cryosam_ray.errors import CryoSamError
from cryosam_ray.storage import filesystem, is_remote, join, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

LEASE_NAME = ".cryosam.lock"


class OutputLockedError(CryoSamError):
    """Another run holds the output folder's lease."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    run_id: str
    expires: float  # seconds since the epoch

    def describe(self) -> str:
        left = self.expires - time.time()
        return (f"run {self.run_id} of {self.owner} on {self.host} (pid {self.pid}), lease valid "
                f"{max(0, left):.0f} s more unless renewed")


def _dead(holder: Holder) -> bool:
    """Whether the holder was a process of this machine that no longer runs (killed, crashed):
    its lease need not be waited out."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class OutputLease:
    """The lease of one output folder (use as a context manager around a run)."""

    def __init__(self, out_dir: str, *, ttl_s: float = 120.0, wait: bool = False, poll_s: float = 5.0,
                 storage_options: dict | None = None):
        self.url = join(out_dir, LEASE_NAME)
        self.ttl_s, self.wait, self.poll_s, self.options = ttl_s, wait, poll_s, storage_options
        self.run_id = uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _me(self) -> Holder:
        return Holder(os.environ.get("USER") or os.environ.get("USERNAME") or "unknown", socket.gethostname(),
                      os.getpid(), self.run_id, time.time() + self.ttl_s)

    def holder(self) -> Holder | None:
        """Who holds the lease now (None: nobody, or a lease that cannot be read)."""
        try:
            return Holder(**json.loads(read_bytes(self.url, self.options)))
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None

    def acquire(self) -> None:
        """Take the lease, waiting for it with ``wait``; raises OutputLockedError otherwise."""
        while True:
            current = self.holder()
            if current is None or current.expires < time.time() or current.run_id == self.run_id or _dead(current):
                if self._try_take(expired=current is not None):
                    break
                current = self.holder()
            who = current.describe() if current else "another run"
            if not self.wait:
                raise OutputLockedError(f"{self.url}: the output folder is in use by {who}; wait for it "
                                        f"(--wait-for-lock) or choose another --out")
            log.info("waiting for %s: held by %s", self.url, who)
            time.sleep(self.poll_s)
        self._renewer = threading.Thread(target=self._renew, name="cryosam-lease", daemon=True)
        self._renewer.start()

    def _try_take(self, *, expired: bool) -> bool:
        data = json.dumps(asdict(self._me())).encode()
        if not is_remote(self.url) and not expired:
            fs, path = filesystem(self.url)
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True
        write_bytes_atomic(self.url, data, storage_options=self.options)
        time.sleep(min(1.0, self.poll_s))  # let a concurrent writer's object land before reading back
        holder = self.holder()
        return holder is not None and holder.run_id == self.run_id

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            holder = self.holder()
            if holder is not None and holder.run_id != self.run_id:
                log.error("%s: the lease was taken over by %s", self.url, holder.describe())
                return
            write_bytes_atomic(self.url, json.dumps(asdict(self._me())).encode(), storage_options=self.options)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        holder = self.holder()
        if holder is not None and holder.run_id == self.run_id:
            fs, path = filesystem(self.url, self.options)
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
