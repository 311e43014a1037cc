"""The mmap threshold is fixed on Linux (glibc), a no-op elsewhere."""

from __future__ import annotations

import sys

import pytest

from cryosam_ray.heap import fix_mmap_threshold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_threshold_is_set_on_linux():
    assert fix_mmap_threshold() is True


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert fix_mmap_threshold() is False
