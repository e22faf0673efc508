"""Config loading: one full default, YAML overrides, key=value, clear errors."""

from pathlib import Path

import pytest

from core.config import ConfigError, load_config, read_yaml
from pretext.train import Config, parse_config

CONFIGS = sorted(Path("pretext/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = parse_config(["--config", str(path)])
    assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = parse_config(["optim.lr=0.01", "mask.kind=central", "optim.betas=[0.9, 0.99]", "seed=3"])
    assert cfg.optim.lr == 0.01 and cfg.mask.kind == "central" and cfg.seed == 3
    assert cfg.optim.betas == (0.9, 0.99)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['optim.lrr'\].*optim.lr"):
        parse_config(["optim.lrr=0.1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mask:\n  knd: central\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*mask.knd.*mask.kind"):
        parse_config(["--config", str(bad)])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.steps=ten", "optim.steps: expected an integer"),
        ("optim.lr=[1]", "optim.lr: expected a number"),
        ("mask.kind=circle", "mask.kind: 'circle' is not one of"),
        ("loss.adversarial=maybe", "loss.adversarial: expected true/false"),
        ("seed", "not of the form key=value"),
    ],
)
def test_wrong_types_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_config([override])


def test_autoencoder_has_no_mask_and_central_inpaint128_predicts_the_centre():
    assert parse_config(["method=autoencoder"]).mask.kind == "none"
    cfg = parse_config(["model.arch=inpaint128", "mask.kind=central"])
    assert cfg.model.output == "center"
    with pytest.raises(ConfigError, match="method=autoencoder"):
        parse_config(["mask.kind=none"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Config, tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        read_yaml(broken)


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 reads "5e-4" as a string; a float field takes it as the number users meant
    assert parse_config(["optim.lr=5e-4"]).optim.lr == 5e-4
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        parse_config(["optim.lr=fast"])


def test_on_off_literals_survive_yaml_booleans():
    # YAML 1.1 reads "on"/"off" as true/false; a Literal["auto", "on", "off"] field gets its words
    assert parse_config(["channels_last=on"]).channels_last == "on"
    assert parse_config(["channels_last=off"]).channels_last == "off"
    with pytest.raises(ConfigError, match="mask.kind: True is not one of"):
        parse_config(["mask.kind=yes"])
