"""storage: URL joins, atomic writes (local and S3), fingerprints, done flags."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryosam_ray.storage import (DoneFlags, exists, fingerprint, join, open_group, read_bytes, write_bytes_atomic,
                                 write_file_atomic)


def test_join_puts_one_slash_between_parts():
    assert join("s3://b/run/", "masks", "/TS_01.mrc") == "s3://b/run/masks/TS_01.mrc"
    assert join("/data/out", "tomograms/", "a.json") == "/data/out/tomograms/a.json"


def test_atomic_write_creates_parents_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "er" / "run.json"
    assert write_bytes_atomic(str(target), b"first") == str(target)
    write_bytes_atomic(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["run.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "picks.csv"
    target.write_bytes(b"old")

    def broken(local):
        with open(local, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomic(str(target), broken)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["picks.csv"]


def test_atomic_write_and_read_on_s3(s3_bucket):
    url = join(s3_bucket, "run", "run.json")
    write_bytes_atomic(url, b'{"ok": 1}')
    assert exists(url) and read_bytes(url) == b'{"ok": 1}'


def test_fingerprint_changes_with_the_file(tmp_path):
    path = tmp_path / "TS_01.mrc"
    path.write_bytes(b"a" * 10)
    before = fingerprint(str(path))
    assert before["size"] == 10 and before == fingerprint(str(path))
    path.write_bytes(b"a" * 11)
    assert fingerprint(str(path)) != before


def test_done_flags_persist_and_reset(tmp_path):
    group = open_group(str(tmp_path / "store.zarr"), "a")
    flags = DoneFlags.create(group, "done0", 5, reset=False)
    assert not flags.all().any() and len(flags) == 5
    flags.set([3, 1])
    reopened = DoneFlags.create(open_group(str(tmp_path / "store.zarr"), "a"), "done0", 5, reset=False)
    np.testing.assert_array_equal(reopened.all(), [False, True, False, True, False])
    np.testing.assert_array_equal(reopened.get([1, 2]), [True, False])
    assert reopened.get([]).shape == (0,)
    assert not DoneFlags.create(group, "done0", 5, reset=True).all().any()


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes_atomic(str(tmp_path / "picks.csv"), b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "picks.csv").stat().st_mode & 0o777 == 0o644  # group and others may read


def test_transient_s3_errors_are_retried_and_permanent_ones_name_the_url(s3_bucket, monkeypatch):
    import s3fs

    from cryosam_ray import storage

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    real_put, calls = s3fs.S3FileSystem.put_file, []

    def flaky(self, lpath, rpath, **kw):
        calls.append(rpath)
        if len(calls) <= 2:
            raise OSError("An error occurred (SlowDown) when calling the PutObject operation: 503")
        return real_put(self, lpath, rpath, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "put_file", flaky)
    url = join(s3_bucket, "out", "picks.csv")
    write_bytes_atomic(url, b"a,b\n")
    assert len(calls) == 3 and read_bytes(url) == b"a,b\n"

    def refused(self, lpath, rpath, **kw):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(s3fs.S3FileSystem, "put_file", refused)
    with pytest.raises(OSError, match="picks2.csv.*Access Denied"):
        write_bytes_atomic(join(s3_bucket, "out", "picks2.csv"), b"x")
