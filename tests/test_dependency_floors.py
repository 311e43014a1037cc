"""The dependency floors in pyproject.toml: the installed versions satisfy them, and each floor is
at least the release that brought a feature the code uses.

A floor below a feature's release installs fine and fails at run time, often with a misleading
message (transformers 4.46 with ``from_pretrained(dtype=...)`` is reported as "cannot load the
weights"). FEATURES is where each floor comes from; raise a floor here and in pyproject.toml
together when the code starts using something newer.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# (distribution, first release with the feature, what the code uses, where the version was read)
FEATURES = [
    ("transformers", "4.48.0", "transformers.Dinov2WithRegistersModel (encoders/dinov2.py)",
     "absent from the transformers 4.47.1 wheel, models/dinov2_with_registers/ in 4.48.0"),
    ("transformers", "4.56.0", "from_pretrained(dtype=...) (encoders/dinov2.py); earlier releases only know "
     "torch_dtype and pass dtype on to the model's __init__",
     "modeling_utils.py pops 'dtype' from 4.56.0 (huggingface/transformers#39782), only 'torch_dtype' in 4.55.4"),
    ("transformers", "4.42.0", "attn_implementation='sdpa' for Dinov2Model (encoders/dinov2.py)",
     "Dinov2SdpaSelfAttention in the 4.47.1 wheel; Dinov2WithRegisters has SDPA from its first release"),
    ("torch", "2.2", "transformers 4.56 (the floor above) requires torch>=2.2",
     "Requires-Dist: torch>=2.2; extra == 'torch' in the transformers 4.56.0 wheel's METADATA"),
    ("torch", "2.1", "F.scaled_dot_product_attention(..., scale=) (segmenters/sam.py SdpaAttention)",
     "no scale argument in the PyTorch 2.0 documentation of scaled_dot_product_attention"),
    ("torch", "2.1", "nn.Module.load_state_dict(assign=True) (segmenters/sam.py build_sam)", "PyTorch 2.1 API"),
    ("torch", "2.0", "torch.compile, with torch.device('meta') (segmenters/sam.py)", "PyTorch 2.0 API"),
    ("torchvision", "0.17", "the torchvision release paired with torch 2.2 (segment-anything imports torchvision.ops)",
     "torchvision 0.17 requires torch 2.2"),
    ("segment-anything", "1.0", "segment_anything.modeling (LayerNorm2d, Attention, get_rel_pos), build_sam._build_sam",
     "1.0 is the only release on PyPI (pip index versions segment-anything)"),
]


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{req} has no floor (>=)"
    return max(floors)


@pytest.mark.parametrize("name", sorted({f[0] for f in FEATURES}))
def test_floor_covers_every_feature_used(name):
    floor = _floor(_requirements()[name])
    for dist, needed, feature, source in FEATURES:
        if dist == name:
            assert floor >= Version(needed), f"{name}>={floor} is below {needed}, needed for {feature} ({source})"


@pytest.mark.parametrize("name", sorted({f[0] for f in FEATURES}))
def test_installed_version_satisfies_pyproject(name):
    req = _requirements()[name]
    installed = importlib.metadata.version(name)
    assert req.specifier.contains(installed, prereleases=True), f"installed {name} {installed} does not satisfy {req}"


def test_the_features_exist_in_the_installed_versions():
    import torch
    import torch.nn.functional as F
    import transformers
    from segment_anything.modeling.image_encoder import Attention, get_rel_pos  # noqa: F401

    assert hasattr(transformers, "Dinov2WithRegistersModel")
    q = torch.randn(1, 1, 3, 4)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q, scale=0.5),
                               torch.softmax(0.5 * q @ q.transpose(-1, -2), dim=-1) @ q)
    assert "assign" in inspect.signature(torch.nn.Module.load_state_dict).parameters
    assert callable(torch.compile) and hasattr(torch.cuda, "OutOfMemoryError")
    source = inspect.getsource(transformers.modeling_utils.PreTrainedModel.from_pretrained)
    assert 'kwargs.pop("dtype"' in source or "dtype" in inspect.signature(
        transformers.modeling_utils.PreTrainedModel.from_pretrained).parameters


def test_every_floored_package_is_a_dependency():
    names = set(_requirements())
    assert {"torch", "torchvision", "transformers", "segment-anything"} <= names
