"""lease: one run at a time per output folder, on local disks and S3."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cryosam_ray.cli import main
from cryosam_ray.lease import LEASE_NAME, OutputLease, OutputLockedError


def test_a_second_run_is_refused_with_the_owner(tmp_path):
    with OutputLease(str(tmp_path)) as first:
        with pytest.raises(OutputLockedError, match=first.run_id) as info:
            OutputLease(str(tmp_path)).acquire()
        assert "--wait-for-lock" in str(info.value)
    assert not (tmp_path / LEASE_NAME).exists()  # released
    with OutputLease(str(tmp_path)):
        pass


def test_an_expired_lease_is_taken_over(tmp_path):
    (tmp_path / LEASE_NAME).write_text(json.dumps({"owner": "x", "host": "gone", "pid": 1, "run_id": "dead",
                                                   "expires": time.time() - 1}))
    with OutputLease(str(tmp_path)) as lease:
        assert lease.holder().run_id == lease.run_id


def test_waiting_for_the_lease(tmp_path):
    first = OutputLease(str(tmp_path))
    first.acquire()
    threading.Timer(0.5, first.release).start()
    t0 = time.perf_counter()
    with OutputLease(str(tmp_path), wait=True, poll_s=0.1) as second:
        assert second.holder().run_id == second.run_id
    assert time.perf_counter() - t0 >= 0.4


def test_the_lease_is_renewed_while_the_run_lives(tmp_path):
    with OutputLease(str(tmp_path), ttl_s=0.3) as lease:
        first = lease.holder().expires
        time.sleep(0.5)
        assert lease.holder().expires > first and lease.holder().run_id == lease.run_id


def test_lease_on_s3(s3_bucket):
    url = f"{s3_bucket}/run"
    with OutputLease(url, poll_s=0.1) as lease:
        with pytest.raises(OutputLockedError, match=lease.run_id):
            OutputLease(url, poll_s=0.1).acquire()
    with OutputLease(url, poll_s=0.1):
        pass


def test_cryosam_run_refuses_an_output_in_use(tmp_path, capsys):
    (tmp_path / "prompts.csv").write_text("tomogram,z,y,x\nTS_01,1,1,1\n")
    with OutputLease(str(tmp_path / "out")) as holder:
        code = main(["run", "--tomograms", str(tmp_path / "TS_01.mrc"), "--prompts", str(tmp_path / "prompts.csv"),
                     "--out", str(tmp_path / "out"), "--address", "none", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "in use by run " + holder.run_id in err, err


def test_the_lease_of_a_killed_process_on_this_machine_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LEASE_NAME).write_text(json.dumps({"owner": "x", "host": socket.gethostname(),
                                                   "pid": int(gone.stdout), "run_id": "killed",
                                                   "expires": time.time() + 3600}))
    with OutputLease(str(tmp_path)) as lease:
        assert lease.holder().run_id == lease.run_id
    alive = {"owner": "x", "host": socket.gethostname(), "pid": os.getpid(), "run_id": "alive",
             "expires": time.time() + 3600}
    (tmp_path / LEASE_NAME).write_text(json.dumps(alive))
    with pytest.raises(OutputLockedError, match="alive"):
        OutputLease(str(tmp_path)).acquire()
