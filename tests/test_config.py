"""Configuration: every shipped file loads, overrides apply, each bad value names its field."""

from __future__ import annotations

import pytest

from lcr_core.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("name", ["cub", "cars", "aircraft", "inat2019", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.run_name.endswith(name)


def test_paper_settings_in_dataset_configs():
    cfg = load_config("cub")
    assert (cfg.backbone, cfg.image_size, cfg.batch_size, cfg.epochs) == ("resnet50", 224, 128, 100)
    assert (cfg.num_projections, cfg.kl_weight, cfg.kl_temperature, cfg.temperature) == (32, 0.01, 0.4, 0.2)
    assert (cfg.queue_size, cfg.embed_dim, cfg.scaled_lr) == (65536, 256, pytest.approx(0.03))


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config("demo", ["kl_weight=0.1", "variant=moco", "use_gpu=true", "backbone_weights=/w.pt"])
    assert (cfg.kl_weight, cfg.variant, cfg.use_gpu, cfg.backbone_weights) == (0.1, "moco", True, "/w.pt")


def test_lr_scales_linearly_with_global_batch():
    assert load_config("cub", ["batch_size=512", "queue_size=65536"]).scaled_lr == pytest.approx(0.12)


@pytest.mark.parametrize("override, field", [
    ("num_projections=0", "num_projections"),
    ("kl_temperature=0", "kl_temperature"),
    ("kl_weight=-0.1", "kl_weight"),
    ("queue_size=1000", "queue_size"),
    ("variant=simclr", "variant"),
    ("backbone=vit", "backbone"),
    ("gradcam_source=logits", "gradcam_source"),
    ("projector=mlp", "projector"),
    ("momentum=1.0", "momentum"),
    ("batch_size=127", "batch_size"),  # 4 workers in the cub config
    ("eval_resize=200", "eval_resize"),
    ("temperature=abc", "temperature"),
    ("use_gpu=maybe", "use_gpu"),
    ("epochs=0", "epochs"),
    ("warmup_epochs=100", "warmup_epochs"),
    ("bn_splits=3", "bn_splits"),
    ("run_name=a/b", "run_name"),
    ("no_such_field=1", "no_such_field"),
])
def test_each_bad_value_is_a_one_line_error_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("cub", [override])
    message = str(err.value)
    assert f"'{field}'" in message and "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("variant: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="field=value"):
        load_config("demo", ["kl_weight"])
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == ["aircraft", "cars", "cub", "demo", "inat2019"]
