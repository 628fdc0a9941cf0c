"""Configuration: every shipped file loads, overrides apply, each bad value names its field."""

from __future__ import annotations

import pytest

from lcr_core.config import (
    AUTHORS_IMAGES_PER_GPU,
    AUTHORS_NU,
    CONFIG_DIR,
    ConfigError,
    LCRConfig,
    config_yaml,
    load_config,
)

PAPER_CONFIGS = ["cub", "cars", "aircraft", "inat2019"]
WEIGHTS = "backbone_weights=/weights/resnet50.pth"


@pytest.mark.parametrize("name", [*PAPER_CONFIGS, "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(name, [] if name == "demo" else [WEIGHTS])
    assert cfg.run_name.endswith(name)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_refuse_random_init_unless_allowed(name):
    with pytest.raises(ConfigError, match="'backbone_weights' = None.*allow_random_init"):
        load_config(name)
    assert load_config(name, ["allow_random_init=true"]).backbone_weights is None


def test_paper_settings_in_dataset_configs():
    cfg = load_config("cub", [WEIGHTS])
    assert (cfg.backbone, cfg.image_size, cfg.batch_size, cfg.epochs) == ("resnet50", 224, 128, 100)
    assert (cfg.num_projections, cfg.kl_temperature, cfg.temperature) == (32, 0.4, 0.2)
    assert (cfg.kl_weight, cfg.kl_reduction) == (pytest.approx(0.32), "mean")
    assert (cfg.queue_size, cfg.embed_dim, cfg.scaled_lr) == (65536, 256, pytest.approx(0.03))


def test_defaults_are_the_papers():
    cfg = LCRConfig()
    assert (cfg.temperature, cfg.kl_temperature, cfg.num_projections, cfg.cl_weight) == (0.2, 0.4, 32, 1.0)
    assert (cfg.momentum, cfg.queue_size, cfg.embed_dim, cfg.lr, cfg.lr_base_batch) == (0.999, 65536, 256, 0.03, 128)
    assert (cfg.gradcam_source, cfg.gradcam_normalize, cfg.fitting_preset) == ("positive_logit", "minmax", "paper")
    assert (cfg.variant, cfg.projector, cfg.gfb_bn_relu) == ("lcr", "bn3", False)
    # nu: the authors' 0.01 summed over 32 images per GPU is 0.32 per image under a batch mean
    assert (AUTHORS_NU, AUTHORS_IMAGES_PER_GPU) == (0.01, 32)
    assert (cfg.kl_weight, cfg.kl_reduction) == (pytest.approx(0.32), "mean")


def test_released_code_preset_sets_its_fields_beneath_explicit_values():
    cfg = load_config("demo", ["fitting_preset=released-code"])
    assert (cfg.gradcam_source, cfg.gradcam_normalize, cfg.gfb_bn_relu) == ("loss", "none", True)
    assert (cfg.kl_reduction, cfg.kl_weight) == ("sum", 0.01)
    assert load_config("demo", ["fitting_preset=released-code", "kl_weight=0.1"]).kl_weight == 0.1


def test_overrides_parse_numbers_as_users_write_them():
    cfg = load_config("demo", ["weight_decay=1e-4", "lr=.5", "kl_weight=3E-2", "epochs=7", "run_name=1e5x"])
    assert (cfg.weight_decay, cfg.lr, cfg.kl_weight, cfg.epochs) == (1e-4, 0.5, 0.03, 7)
    assert isinstance(cfg.epochs, int) and cfg.run_name == "1e5x"


def test_an_override_error_names_the_override_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["epochs=many"])
    assert "override 'epochs=many'" in str(err.value) and "demo.yaml" not in str(err.value)
    with pytest.raises(ConfigError, match="override 'colour=red'"):
        load_config("demo", ["colour=red"])


def test_printed_config_reads_back_to_the_same_object(tmp_path):
    cfg = load_config("demo", ["weight_decay=1e-4", "freeze_stages=1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_yaml(cfg))
    assert load_config(path) == cfg


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config("demo", ["kl_weight=0.1", "variant=moco", "use_gpu=true", "backbone_weights=/w.pt"])
    assert (cfg.kl_weight, cfg.variant, cfg.use_gpu, cfg.backbone_weights) == (0.1, "moco", True, "/w.pt")


def test_lr_scales_linearly_with_global_batch():
    assert load_config("cub", [WEIGHTS, "batch_size=512", "queue_size=65536"]).scaled_lr == pytest.approx(0.12)


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
    ("gradcam_normalize=softmax", "gradcam_normalize"),
    ("kl_reduction=batchmean", "kl_reduction"),
    ("fitting_preset=authors", "fitting_preset"),
    ("freeze_stages=5", "freeze_stages"),  # resnet50 has 5 stages; the last must train
    ("gfb_lr_scale=0", "gfb_lr_scale"),
    ("lr=.inf", "lr"),
    ("backbone_weights=imagenet", "backbone_weights"),  # packaged for efficientnet_lite0 only
    ("shards=", "shards"),  # YAML reads an empty value as null
    ("storage_path=", "storage_path"),
])
def test_each_bad_value_is_a_one_line_error_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("cub", [WEIGHTS, override])
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


def test_print_config_prints_the_resolved_config_and_starts_nothing(capsys):
    import ray
    import yaml

    from components.cli import main

    overrides = ["weight_decay=1e-4", "fitting_preset=released-code"]
    assert main(["pretrain", "--config", "demo", "--print-config", *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["weight_decay"], printed["gradcam_source"], printed["kl_reduction"]) == (1e-4, "loss", "sum")
    assert not ray.is_initialized()
    assert main(["pretrain", "--config", "demo", "--print-config", "epochs=many"]) == 2
    assert "override 'epochs=many'" in capsys.readouterr().err
