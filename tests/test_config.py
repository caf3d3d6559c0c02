from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, config_from_dict, load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.batch_size) == (2e-4, 0.5, 128)
    assert (cfg.model.z_dim, cfg.model.z_dist, cfg.model.init_std) == (100, "uniform", 0.02)


@pytest.mark.parametrize("preset", ["fashion-mnist-32", "lsun-bedroom-64"])
def test_presets_load(preset):
    cfg = load_config(ROOT / "configs" / f"{preset}.toml")
    assert cfg.model.resolution in (32, 64)


def test_lsun_preset_uses_paper_widths():
    cfg = load_config(ROOT / "configs" / "lsun-bedroom-64.toml")
    assert cfg.model.ngf * 8 == 1024 and cfg.model.channels == 3


def test_overrides_parse_types():
    cfg = load_config(None, ["optim.lr=1e-4", "precision.dtype=bf16", "logging.progress=false",
                             "optim.epochs=2", "data.shards=/some/where"])
    assert cfg.optim.lr == 1e-4 and cfg.precision.dtype == "bf16" and cfg.logging.progress is False
    assert cfg.optim.epochs == 2 and cfg.data.shards == "/some/where"


def test_int_accepted_for_float():
    assert load_config(None, ["optim.beta1=0"]).optim.beta1 == 0.0


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'.*optim\.lr"):
        load_config(None, ["optim.learning_rate=1e-3"])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match="valid keys: .*model.ngf"):
        load_config(p)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=2", r"optim.lr = 2.0 is out of range: must be in \(0, 1\)"),
    ("model.resolution=48", "one of 32, 64, 128"),
    ("precision.dtype=fp8", "one of 'auto', 'fp32', 'bf16', 'fp16'"),
    ("precision.zero_stage=3", "0, 1 or 2"),
    ("optim.epochs=ten", "optim.epochs must be int"),
    ("model.channels=true", "model.channels must be int"),
    ("checkpoint.on_nonfinite=ignore", "'stop' or 'skip'"),
])
def test_bad_values_name_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_toml_and_dict_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "fashion-mnist-32.toml", ["optim.lr=3e-4"])
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
