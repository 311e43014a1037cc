"""Shared fixtures: small volumes on disk, and a local S3 endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import socket

import mrcfile
import numpy as np
import pytest

# Every Ray the tests start binds to 127.0.0.1 (read when Ray is imported): no test traffic
# leaves loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture
def small_volume() -> np.ndarray:
    """(20, 24, 28) float32 ZYX volume with a distinct value per voxel, so slabs are checkable."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 24, 28)).astype(np.float32)


@pytest.fixture
def mrc_path(tmp_path, small_volume):
    path = tmp_path / "TS_01.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(small_volume)
        mrc.voxel_size = 13.5
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback; sets the standard AWS variables so s3fs finds it.

    Yields the endpoint URL. Nothing leaves 127.0.0.1.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the local endpoint; yields 's3://<bucket>'."""
    import boto3
    import s3fs

    name = f"test-{np.random.default_rng().integers(1 << 30)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
