"""`init_from`, a warm start: a new run starts from a trained model's weights (a checkpoint, a run folder,
a registered model by alias or version), a resumed run from its own checkpoint; a source that cannot be
read or has another architecture is refused before Ray starts, in one line.

The registry test talks to a real `mlflow server` subprocess (the `mlflow_server` fixture, SQLite
behind it). The end-to-end runs join the Ray head of tests/test_pretrain.py (`ray start --head` on
127.0.0.1, 2 CPUs) and train the tiny backbone at an lr so small that a step leaves every parameter as
it was (1e-30 times a gradient is below half an ulp of any weight here): the parameters a run ends with
are those it started from."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from components import checkpoint, cli, pretrain, tracking, warm_start
from components.checkpoint import Progress
from components.warm_start import INIT_FROM_TAG, WarmStartError
from lcr_core.config import ConfigError, LCRConfig, config_yaml, load_config
from lcr_core.errors import LCRError
from lcr_core.model import build_model
from lcr_core.train import build_optimizer, build_scheduler
from tests.test_preflight import no_ray  # noqa: F401  (a fixture)
from tests.test_pretrain import STEPS_PER_EPOCH, ray_cluster, shards, tiny_config  # noqa: F401  (fixtures)

SOURCE_STEP = 12  # the source run's progress, which a warm start must not take over


def source_config(**overrides) -> LCRConfig:
    """The architecture of `tests.test_pretrain.tiny_config`, as a previous run wrote it."""
    values = {"backbone": "tiny", "image_size": 32, "eval_resize": 32, "batch_size": 8, "num_workers": 2,
              "queue_size": 16, "embed_dim": 16, "projector_hidden": 32, "num_projections": 4, "run_name": "prev"}
    return LCRConfig(**(values | overrides)).validate()


def write_source(run: Path, seed: int, cfg: LCRConfig | None = None) -> dict[str, torch.Tensor]:
    """A previous run's folder with one checkpoint; returns its model state. Every parameter is moved
    off its initial value (no zero BN bias, a key encoder unlike the query encoder), as training does."""
    cfg = cfg or source_config()
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    optimizer = build_optimizer(model, cfg)
    state = checkpoint.training_state(model, optimizer, build_scheduler(optimizer, cfg, 4),
                                      Progress(3, 0, SOURCE_STEP), [checkpoint.rng_state()], cfg.to_dict())
    folder = run / f"checkpoint_{SOURCE_STEP:08d}"
    folder.mkdir(parents=True)
    checkpoint.save_checkpoint(folder, state)
    return state["model"]


def differing(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str) -> list[str]:
    names = [name for name in expected if name.startswith(prefix)]
    assert names, prefix
    return [name for name in names if not torch.equal(state[name], expected[name])]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Reading a source and loading it

def test_a_checkpoint_gives_the_whole_model_but_the_queue(tmp_path):
    run = tmp_path / "runs" / "prev"
    saved = write_source(run, seed=1)
    source = warm_start.read_source(str(run))  # a run folder: its newest intact checkpoint
    assert source.tags() == {INIT_FROM_TAG: str(run),
                             f"{INIT_FROM_TAG}.checkpoint": str(run / f"checkpoint_{SOURCE_STEP:08d}")}
    assert source.config.num_projections == 4 and "queue" not in source.weights

    torch.manual_seed(2)
    model = build_model(source_config(run_name="next"))
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert differing(fresh, saved, "encoder_q.") and differing(fresh, saved, "encoder_k.")  # not alike already
    warm_start.load_weights(model, source.weights)
    loaded = model.state_dict()
    assert differing(loaded, saved, "encoder_q.") == [] and differing(loaded, saved, "encoder_k.") == []
    assert not torch.equal(saved["encoder_k.projector.0.weight"], saved["encoder_q.projector.0.weight"])
    assert torch.equal(loaded["queue"], fresh["queue"]) and not torch.equal(loaded["queue"], saved["queue"])
    assert int(loaded["queue_ptr"]) == 0


def test_weights_of_another_architecture_are_refused_by_name(tmp_path):
    write_source(tmp_path / "prev", seed=1)
    source = warm_start.read_source(str(tmp_path / "prev"))
    with pytest.raises(WarmStartError) as err:  # the moco model has no GradCAM fitting branch
        warm_start.load_weights(build_model(source_config(variant="moco")), source.weights)
    assert one_line(err) == ("init_from weights do not fit the tiny/moco model (0 missing e.g. [], 2 unexpected "
                             "e.g. ['encoder_q.gfb.projections.weight'])")


@pytest.mark.slow
def test_a_registered_model_resolves_by_alias_to_a_pinned_version(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    saved, runs = {}, {}
    for seed in (1, 2):
        saved[seed] = write_source(tmp_path / f"seed{seed}", seed)
        model = tracking.load_encoder(tmp_path / f"seed{seed}")
        runs[seed] = tracking.start_run(mlflow_server, model.cfg, {"lcr.step": "pretrain"})
        model_uri = tracking.log_encoder(mlflow_server, runs[seed], model.state_dict(), model.cfg)
        tracking.end_run(mlflow_server, runs[seed], succeeded=True)
        assert mlflow.register_model(model_uri, "warm").version == str(seed)

    for version in (1, 2):
        client.set_registered_model_alias("warm", "champion", str(version))
        source = warm_start.read_source("models:/warm@champion")
        assert source.tags() == {INIT_FROM_TAG: "models:/warm@champion", f"{INIT_FROM_TAG}.model_name": "warm",
                                 f"{INIT_FROM_TAG}.model_version": str(version),
                                 f"{INIT_FROM_TAG}.run_id": runs[version]}
        # an MLflow model holds the query encoder: it starts the key encoder too, as MoCo starts
        encoder_q = {name: tensor for name, tensor in saved[version].items() if name.startswith("encoder_q.")}
        as_key = {name.replace("encoder_q.", "encoder_k.", 1): tensor for name, tensor in encoder_q.items()}
        assert set(source.weights) == set(encoder_q) | set(as_key)
        assert differing(source.weights, encoder_q | as_key, "encoder_") == []
    assert warm_start.pinned("models:/warm/1") == ("models:/warm/1", {f"{INIT_FROM_TAG}.model_name": "warm",
                                                                       f"{INIT_FROM_TAG}.model_version": "1",
                                                                       f"{INIT_FROM_TAG}.run_id": runs[1]})

    with pytest.raises(WarmStartError) as err:
        warm_start.read_source("models:/warm@nobody")
    assert one_line(err).startswith("init_from") and "models:/warm@nobody" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Before Ray starts

def test_init_from_values_the_config_refuses():
    for value, expected in (("''", "'init_from' = ''"), ("3", "'init_from' = 3")):
        with pytest.raises(ConfigError, match=expected):
            load_config(None, [f"init_from={value}"])
    # a config that refuses random weights accepts a warm start instead of backbone_weights
    assert load_config("cub", ["init_from=models:/lcr@champion"]).backbone_weights is None
    with pytest.raises(ConfigError, match="or init_from to start from a trained model"):
        load_config("cub")


def test_an_incompatible_source_is_refused_before_ray_in_one_line(tmp_path, shards, no_ray):  # noqa: F811
    run = tmp_path / "prev"
    write_source(run, seed=1)
    cfg = tiny_config(shards, f"storage_path={tmp_path / 'runs'}", "embed_dim=32", "num_projections=8",
                      f"init_from={run}")
    with pytest.raises(LCRError) as err:
        pretrain.pretrain(cfg)
    assert one_line(err) == (f"init_from {run}: embed_dim 16 != this run's 32, num_projections 4 != this run's 8; "
                             "expected a model of this run's architecture (or another init_from)")


def test_an_unreadable_source_is_one_line_naming_it(tmp_path, shards, capsys, no_ray):  # noqa: F811
    config = tmp_path / "run.yaml"
    config.write_text(config_yaml(tiny_config(shards, f"storage_path={tmp_path / 'runs'}")))
    nowhere = tmp_path / "nowhere"
    assert cli.main(["pretrain", "--config", str(config), f"init_from={nowhere}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lcr pretrain: error: init_from: {nowhere}: no such folder; expected it to exist"
    damaged = tmp_path / "damaged"
    write_source(damaged, seed=1)
    file = damaged / f"checkpoint_{SOURCE_STEP:08d}" / checkpoint.CHECKPOINT_FILE
    file.write_bytes(file.read_bytes()[:1000])
    assert cli.main(["pretrain", "--config", str(config), f"init_from={damaged}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # a warning about the damaged checkpoint comes first
    assert err == (f"lcr pretrain: error: init_from: model {damaged}: none of its 1 checkpoints reads back whole "
                   "(see the warnings above); expected at least one intact checkpoint")
    assert cli.main(["pretrain", "--config", str(config), "init_from=init:demo"]) == 2
    assert capsys.readouterr().err.startswith("lcr pretrain: error: init_from init:demo: an untrained network; ")


def test_the_printed_config_says_backbone_weights_are_not_loaded(tmp_path):
    cfg = tiny_config(tmp_path, "backbone_weights=/weights/tiny.pt", "init_from=models:/lcr@champion")
    summary = pretrain.config_summary(cfg)
    assert summary.endswith("# backbone_weights is not loaded: init_from's weights replace it\n")
    assert "init_from" in summary and "not loaded" not in pretrain.config_summary(tiny_config(tmp_path))


# ---------------------------------------------------------------------------------------------
# End to end on Ray

def parameters_of(cfg: LCRConfig) -> set[str]:
    return {name for name, _ in build_model(cfg).named_parameters()}


@pytest.mark.slow
def test_a_new_run_starts_from_the_source_and_a_resumed_one_ignores_it(ray_cluster, shards, mlflow_server,  # noqa: F811
                                                                        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    first, second = tmp_path / "sources" / "first", tmp_path / "sources" / "second"
    saved, other = write_source(first, seed=1), write_source(second, seed=2)
    unused = tmp_path / "tiny-backbone.pt"  # superseded by init_from: never loaded
    torch.save({name.removeprefix("encoder_q.backbone."): tensor for name, tensor in other.items()
                if name.startswith("encoder_q.backbone.")}, unused)
    overrides = ["run_name=warm", f"storage_path={tmp_path / 'runs'}", "epochs=1", "lr=1e-30", "weight_decay=0",
                 f"backbone_weights={unused}"]

    started = pretrain.pretrain(tiny_config(shards, *overrides, f"init_from={first}", stop_after_step=1,
                                            dump_final_weights=str(tmp_path / "started")))
    out = capsys.readouterr().out
    assert f"warm start from {first} (checkpoint {first / f'checkpoint_{SOURCE_STEP:08d}'})" in out
    assert "# backbone_weights is not loaded" in out
    assert started.metrics["global_step"] == 1  # the step count starts afresh
    tags = tracking.run_tags(mlflow_server, started.mlflow_run_id)
    assert tags[INIT_FROM_TAG] == str(first)
    assert tags[f"{INIT_FROM_TAG}.checkpoint"] == str(first / f"checkpoint_{SOURCE_STEP:08d}")
    cfg = source_config()
    query = {name for name in parameters_of(cfg) if name.startswith("encoder_q.")}
    key = {name.replace("encoder_q.", "encoder_k.", 1): name for name in query}
    momentum = cfg.momentum
    for rank in range(2):  # rank 0 loaded them, DDP gave them to rank 1
        weights = torch.load(tmp_path / "started" / f"rank{rank}.pt", weights_only=True)
        assert [name for name in query if not torch.equal(weights[name], saved[name])] == []
        # the step moved the key encoder once towards the query encoder, from the source's key encoder
        moved = {k: saved[k].clone().mul_(momentum).add_(saved[q], alpha=1 - momentum) for k, q in key.items()}
        assert [name for name in key if not torch.equal(weights[name], moved[name])] == []
        # the queue starts afresh: the step wrote its first 8 columns, the rest is not the source's
        assert not torch.equal(weights["queue"][:, 8:], saved["queue"][:, 8:])

    resumed = pretrain.pretrain(tiny_config(shards, *overrides, f"init_from={second}",
                                            dump_final_weights=str(tmp_path / "resumed")))
    assert f"init_from {second} ignored: run warm resumes from its own checkpoint" in capsys.readouterr().out
    assert resumed.metrics["global_step"] == STEPS_PER_EPOCH
    assert INIT_FROM_TAG not in tracking.run_tags(mlflow_server, resumed.mlflow_run_id)
    weights = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=True)
    assert [name for name in query if not torch.equal(weights[name], saved[name])] == []
    assert all(not torch.equal(weights[name], other[name]) for name in query)
