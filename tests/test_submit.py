"""`cryosam submit` against a real local Ray head on 127.0.0.1 with token authentication."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cryosam_ray.cli import main
from cryosam_ray.submit import SubmitError, submission_id

TOKEN = "cryosam-test-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` with its job server on 127.0.0.1, token authentication on."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    port, dashboard = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=1",
                    f"--temp-dir={temp}", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submission_id_is_name_and_date():
    assert submission_id("nightly", dt.date(2026, 11, 24)) == "nightly-20261124"
    with pytest.raises(SubmitError, match="letters, digits"):
        submission_id("bad name!")


def test_job_runs_to_completion_and_logs_come_back(head, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    out = tmp_path / "synth"
    job = ["--", "cryosam", "synth", "--out", str(out), "--n", "1", "--shape", "32", "48", "48", "--builtin-shapes"]
    assert main(["submit", "--address", head, "--name", "synthjob", "--wait", *job]) == 0
    printed = capsys.readouterr().out
    assert f"synthjob-{dt.date.today():%Y%m%d}: submitted" in printed
    assert "wrote 1 tomograms" in printed and "SUCCEEDED" in printed  # the job's own log came back
    assert (out / "synth_000.mrc").exists()
    # the same name on the same day is the same job: not run twice
    assert main(["submit", "--address", head, "--name", "synthjob", *job]) == 0
    assert "already submitted" in capsys.readouterr().out


def test_a_failing_job_gives_exit_code_1(head, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    job = ["--", "cryosam", "evaluate", "--truth", str(tmp_path / "none.csv"), "--picks", str(tmp_path / "none.csv")]
    assert main(["submit", "--address", head, "--name", "failing", "--wait", *job]) == 1
    assert "ended FAILED" in capsys.readouterr().err


def test_a_wrong_token_is_refused_with_a_clear_error(head, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["submit", "--address", head, "--name", "refused", "--", "cryosam", "--help"]) == 2
    assert "refused the request" in capsys.readouterr().err


def test_an_unreachable_cluster_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--name", "x", "--",
                 "cryosam", "--help"]) == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err


def test_only_cryosam_commands_are_submitted(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--name", "x", "--", "rm", "-rf", "/"]) == 2
    assert "must be a cryosam command" in capsys.readouterr().err
