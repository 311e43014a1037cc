"""Datasets shared by test modules."""

from __future__ import annotations

from pathlib import Path

from cryosam_ray.synth import SynthSettings, write_dataset


def ribosome_dataset(root: Path, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    """Two synthetic tomograms (built-in shapes, SNR 0.5, seed 5) in ``root/data`` and their
    ribosome prompts in ``root/prompts.csv`` (outside the data folder). Returns (root, data)."""
    data = root / "data"
    write_dataset(str(data), n=2, seed=5, settings=SynthSettings(shape=shape, snr=0.5, use_real_maps=False))
    lines = (data / "prompts.csv").read_text().splitlines()
    ribosomes = [line for line in lines[1:] if line.endswith(",ribosome")]
    (root / "prompts.csv").write_text("\n".join([lines[0], *ribosomes]) + "\n")
    (data / "prompts.csv").unlink()
    return root, data
