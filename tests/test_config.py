"""Typed config: YAML files, dotted overrides, one validation with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cryosam_ray.config import CONFIG_DIR, CryoSamConfig, load_config, parse_override
from cryosam_ray.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, CryoSamConfig)
    assert cfg.evaluate.radius_fraction == 0.5 and cfg.evaluate.beta == 4.0


def test_every_config_file_parses_with_known_keys():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert files, "configs/ holds the shipped job configs"
    for file in files:
        load_config(file)  # raises ConfigError on an unknown key or bad value


def test_named_config_and_overrides():
    cfg = load_config("demo", {"synth.snr": 0.7, "synth.shape": [32, 64, 64]})
    assert cfg.synth.snr == 0.7 and cfg.synth.shape == (32, 64, 64)
    assert parse_override("synth.classes=[ribosome]") == ("synth.classes", ["ribosome"])


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"synth": {"snrr": 1.0}}))
    with pytest.raises(ConfigError, match=r"job.yaml: invalid config:\n  synth.snrr: Extra inputs"):
        load_config(path)


@pytest.mark.parametrize("override, key", [({"synth.snr": -1}, "synth.snr"),
                                           ({"synth.shape": [8, 64, 64]}, "synth.shape"),
                                           ({"synth.polarity": "dark"}, "synth.polarity"),
                                           ({"evaluate.beta": "four"}, "evaluate.beta")])
def test_bad_values_are_reported_by_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("synth.snr")


def test_config_dir_is_the_repository_configs():
    assert CONFIG_DIR == Path(__file__).resolve().parent.parent / "configs"


def test_bad_override_values_are_config_errors():
    from cryosam_ray.config import load_config, parse_override
    from cryosam_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("matching.top_k=[")
    with pytest.raises(ConfigError, match="garbage"):
        load_config(None, {"ray.address": "garbage"})
    assert load_config(None, {"ray.address": "10.0.0.1:6379"}).ray.address == "10.0.0.1:6379"
