from pathlib import Path

import pytest

from blip_core.config import MODEL_PRESETS, Config, ConfigError, config_from_dict, load_config, model_preset

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_loads():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.model.preset in MODEL_PRESETS


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.model.preset == "toy"
    assert cfg.pretrain.weight_decay == 0.05


def test_dotted_override_changes_exactly_one_field():
    base = load_config(None)
    cfg = load_config(None, ["pretrain.lr=1e-4"])
    assert cfg.pretrain.lr == pytest.approx(1e-4)
    assert isinstance(cfg.pretrain.lr, float)
    base.pretrain.lr = cfg.pretrain.lr
    assert base == cfg


def test_preset_then_overrides():
    cfg = config_from_dict({"model": {"preset": "base", "vision": {"image_size": 384}}})
    assert cfg.model.vision.image_size == 384
    assert cfg.model.vision.width == 768 and cfg.model.text.vocab_size == 30524
    cfg = load_config(None, ["model.preset=large"])
    assert cfg.model.vision.width == 1024 and cfg.model.vision.depth == 24
    assert model_preset("tiny").vision.image_size == 32


@pytest.mark.parametrize(
    "tree, overrides, key",
    [
        ({"pretrain": {"lrr": 1.0}}, [], "pretrain.lrr"),
        ({"nosuchsection": {}}, [], "nosuchsection"),
        ({"model": {"vision": {"depthh": 3}}}, [], "model.vision.depthh"),
        ({}, ["pretrain.epochs=abc"], "pretrain.epochs"),
        ({}, ["pretrain.epochs=1.5"], "pretrain.epochs"),
        ({}, ["data.randaugment=3"], "data.randaugment"),
        ({}, ["pretrain.schedule=linear"], "pretrain.schedule"),
        ({}, ["model.preset=huge"], "model.preset"),
        ({}, ["model.vision.stem=cnn"], "model.vision.stem"),
        ({"pretrain": 3}, [], "pretrain"),
    ],
)
def test_bad_values_name_the_key(tree, overrides, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree, overrides)
    assert key in str(err.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "p.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("pretrain:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(p).pretrain.lr == pytest.approx(1e-4)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["pretrain.lr"])
