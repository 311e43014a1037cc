"""``cryosam submit``: hand a ``cryosam run`` to a running Ray cluster through the Jobs API.

The submission id is ``<name>-<YYYYMMDD>``, so a nightly job submitted twice on the same day is
one job: the second submission reports the first one instead of running the data again.
Token authentication (Ray >= 2.52): the token comes from ``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from pathlib import Path

import yaml

from cryosam_ray.errors import CryoSamError

log = logging.getLogger(__name__)

_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(CryoSamError):
    """The cluster could not be reached, refused the request, or the job failed."""


def submission_id(name: str, date: dt.date | None = None) -> str:
    """``<name>-<YYYYMMDD>``: deterministic, so resubmitting the same day finds the same job."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SubmitError(f"job name {name!r}: use letters, digits, '-', '_' and '.' only")
    return f"{name}-{(date or dt.date.today()).strftime('%Y%m%d')}"


def load_runtime_env(path: str | None) -> dict:
    """A Ray runtime environment from a YAML or JSON file (``pip``, ``env_vars``, ``working_dir`` ...)."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"{path}: cannot read the runtime environment ({exc})") from exc
    if not isinstance(data, dict):
        raise SubmitError(f"{path}: expected a mapping (pip, env_vars, working_dir ...), got {type(data).__name__}")
    return data


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    headers = {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or AuthenticationError here
        raise SubmitError(_explain(address, exc)) from exc


def _explain(address: str, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "401" in text or "403" in text or "uthentica" in text or "nauthorized" in text:
        return (f"the cluster at {address} refused the request: token authentication is on and the token is "
                f"missing or wrong; set RAY_AUTH_TOKEN to the cluster's token ({text.splitlines()[0]})")
    return f"cannot reach the Ray job server at {address} (is the head node up, and is this its dashboard " \
           f"address, usually http://HEAD:8265?): {text.splitlines()[0]}"


def submit(entrypoint: list[str], *, address: str, name: str, runtime_env: dict | None = None,
           date: dt.date | None = None, wait: bool = False, poll_s: float = 2.0, echo=print) -> str:
    """Submit (or find, if already submitted today) the job; with ``wait``, follow it to the end.

    Returns the final status with ``wait``, else the current one.

    Raises:
        SubmitError: unreachable or refusing cluster; with ``wait``, a job that did not succeed.
    """
    if not entrypoint or entrypoint[0] != "cryosam":
        raise SubmitError(f"the job must be a cryosam command (for example: -- cryosam run ...), got {entrypoint!r}")
    job_id = submission_id(name, date)
    client = _client(address)
    try:
        existing = {job.submission_id for job in client.list_jobs()}
        if job_id in existing:
            echo(f"{job_id}: already submitted ({client.get_job_status(job_id)}); not submitting again")
        else:
            import shlex

            client.submit_job(entrypoint=shlex.join(entrypoint), submission_id=job_id,
                              runtime_env=runtime_env or None, metadata={"submitted_by": "cryosam submit"})
            echo(f"{job_id}: submitted to {address}")
        if not wait:
            return str(client.get_job_status(job_id))
        return _follow(client, job_id, poll_s, echo)
    except SubmitError:
        raise
    except Exception as exc:
        raise SubmitError(_explain(address, exc)) from exc


def _follow(client, job_id: str, poll_s: float, echo) -> str:
    """Print the job's new log lines as they come, until it ends; returns the final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            echo(logs[printed:].rstrip("\n"))
            printed = len(logs)
        if status.rsplit(".", 1)[-1] in _TERMINAL:
            break
        time.sleep(poll_s)
    status = status.rsplit(".", 1)[-1]
    info = client.get_job_info(job_id)
    echo(f"{job_id}: {status}" + (f" ({info.message})" if info.message else ""))
    if status != "SUCCEEDED":
        raise SubmitError(f"job {job_id} ended {status}: {info.message or 'see its logs above'}")
    return status
