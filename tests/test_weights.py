"""resolve_weights: local paths, s3 (file and folder) through moto, http through a local server."""

from __future__ import annotations

import http.server
import socket
import threading
from functools import partial

import fsspec
import pytest

from cryosam_ray.errors import WeightsError
from cryosam_ray.weights import cache_path, file_fingerprint, resolve_weights


def test_local_file_and_folder_are_used_in_place(tmp_path):
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"weights")
    assert resolve_weights(str(ckpt)) == ckpt
    assert resolve_weights(f"file://{ckpt}") == ckpt
    assert resolve_weights(tmp_path) == tmp_path


def test_missing_local_path_names_the_source(tmp_path):
    missing = tmp_path / "nope" / "sam_vit_h.pth"
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(missing), cache_dir=tmp_path / "cache")
    assert info.value.source == str(missing)
    assert "no such file" in str(info.value)


def test_s3_file_is_downloaded_once(s3_bucket, tmp_path):
    fs = fsspec.filesystem("s3")
    url = f"{s3_bucket}/models/sam_vit_tiny.pth"
    fs.pipe_file(url, b"0123456789" * 1000)
    cache = tmp_path / "cache"
    local = resolve_weights(url, cache_dir=cache)
    assert local == cache_path(url, cache_dir=cache)
    assert local.name == "sam_vit_tiny.pth" and local.read_bytes() == b"0123456789" * 1000
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".")]  # no temp left behind

    fs.rm(url)  # the second call must not touch S3 at all
    assert resolve_weights(url, cache_dir=cache) == local
    with pytest.raises(WeightsError, match="sam_vit_tiny.pth"):  # the object is really gone
        resolve_weights(url, cache_dir=tmp_path / "other-cache")


def test_s3_folder_is_downloaded_recursively(s3_bucket, tmp_path):
    fs = fsspec.filesystem("s3")
    base = f"{s3_bucket}/hub/dinov2-tiny"
    fs.pipe_file(f"{base}/config.json", b"{}")
    fs.pipe_file(f"{base}/weights/model.safetensors", b"abc")
    local = resolve_weights(base, cache_dir=tmp_path)
    assert local.is_dir() and local.name == "dinov2-tiny"
    assert (local / "config.json").read_bytes() == b"{}"
    assert (local / "weights" / "model.safetensors").read_bytes() == b"abc"
    fs.rm(base, recursive=True)
    assert resolve_weights(base, cache_dir=tmp_path) == local


def test_s3_missing_object_raises(s3_bucket, tmp_path):
    url = f"{s3_bucket}/models/absent.pth"
    with pytest.raises(WeightsError) as info:
        resolve_weights(url, cache_dir=tmp_path)
    assert info.value.source == url
    assert not cache_path(url, cache_dir=tmp_path).exists()


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (base_url, list of request paths)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests, root
    server.shutdown()
    server.server_close()


def test_http_file_is_downloaded_once(http_server, tmp_path):
    base, requests, root = http_server
    (root / "sam_vit_b.pth").write_bytes(b"x" * 5000)
    url = f"{base}/sam_vit_b.pth"
    cache = tmp_path / "cache"
    local = resolve_weights(url, cache_dir=cache)
    assert local.read_bytes() == b"x" * 5000 and local.name == "sam_vit_b.pth"
    assert requests == ["/sam_vit_b.pth"]
    assert resolve_weights(url, cache_dir=cache) == local
    assert len(requests) == 1


def test_http_404_raises_and_caches_nothing(http_server, tmp_path):
    base, _, _ = http_server
    url = f"{base}/missing.pth"
    with pytest.raises(WeightsError, match="404") as info:
        resolve_weights(url, cache_dir=tmp_path)
    assert info.value.source == url
    assert not cache_path(url, cache_dir=tmp_path).exists()


def test_unreachable_server_raises(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(WeightsError, match="reach"):
        resolve_weights(f"http://127.0.0.1:{port}/sam.pth", cache_dir=tmp_path)


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYOSAM_CACHE", str(tmp_path))
    assert cache_path("s3://b/sam.pth").parent.parent == tmp_path


def test_fingerprint_ignores_path_and_mtime(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "sub" / "b.pth"
    b.parent.mkdir()
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert file_fingerprint(a) == file_fingerprint(b)
    b.write_bytes(b"diff")
    assert file_fingerprint(a) != file_fingerprint(b)
