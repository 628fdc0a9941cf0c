"""The evaluation steps end to end: synthetic shards, a tiny encoder, a real MLflow server."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from components import cli
from components import features as features_module
from components.checkpoint import Progress, load_checkpoint, rng_state, save_checkpoint, training_state
from components.data import eval_loader, read_manifest
from components.features import (
    EvaluationSetup,
    default_poolings,
    load_model,
    model_fingerprint,
    read_features,
    split_features,
)
from components.probe import probe_features, probe_fraction, run_probes
from components.report import report
from components.retrieve import CHECKSUM_TAG, manifest_checksum, retrieve
from components.shards import build_shards
from components.summary import pipeline_summary
from lcr_core.config import LCRConfig
from lcr_core.metrics import retrieval_metrics
from lcr_core.model import build_model
from lcr_core.probe import per_class_count
from lcr_core.train import build_optimizer, build_scheduler

SPEC = {"num_classes": 3, "train_per_class": 6, "test_per_class": 4, "image_size": 48}
PNGS = ("attention.png", "projections.png", "retrieval.png")


def tiny_config(shards: Path, **overrides) -> LCRConfig:
    values = {"backbone": "tiny", "image_size": 48, "eval_resize": 48, "batch_size": 4, "queue_size": 8,
              "embed_dim": 16, "projector_hidden": 32, "num_projections": 4, "shards": str(shards),
              "loader_workers": 0, "run_name": "eval-test", "mlflow_experiment": "eval-tests"}
    return LCRConfig(**{**values, **overrides}).validate()


def write_checkpoint(folder: Path, cfg: LCRConfig, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    state = training_state(model, optimizer, build_scheduler(optimizer, cfg, 1), Progress(), [rng_state()],
                           cfg.to_dict())
    folder.mkdir(parents=True)
    return save_checkpoint(folder, state)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    build_shards("synthetic", str(root), options=SPEC, maxcount=5, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "ckpt", tiny_config(shards))


@pytest.fixture
def tracking(mlflow_server, monkeypatch) -> mlflow.MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow.MlflowClient(mlflow_server)


def setup_for(model, shards: Path, cache: Path) -> EvaluationSetup:
    return EvaluationSetup(model, str(shards), default_poolings(model), batch_size=5, workers=0,
                           cache_dir=str(cache))


def last_run(client: mlflow.MlflowClient, name: str):
    experiment = client.get_experiment_by_name("eval-tests")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"])
    return runs[0]


def embed_directly(model, split_uri: str, pooling: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The reference: the model's own `embed` over the split, batch by batch."""
    chunks, labels, keys = [], [], []
    with torch.no_grad():
        for images, batch_labels, batch_keys in eval_loader(split_uri, 48, 48, batch_size=3):
            chunks.append(model.embed(images, pooling))
            labels.append(batch_labels)
            keys += batch_keys
    return torch.cat(chunks).numpy(), torch.cat(labels).numpy(), keys


def test_retrieve_caches_features_and_logs_metrics(shards, checkpoint, tracking, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["retrieve", "--model", str(checkpoint), "--shards", str(shards), "--cache-dir", str(cache),
            "--workers", "0", "--batch-size", "5"]
    assert cli.main(argv) == 0
    assert "attention" in capsys.readouterr().out
    files = sorted(cache.glob("*.parquet"))
    assert len(files) == 2  # attention and gap

    model = load_model(str(checkpoint))
    run = last_run(tracking, "eval-test-retrieve")
    for path in files:
        cached = read_features(path)
        embeddings, labels, keys = embed_directly(model, str(shards / "test"), cached.pooling)
        assert cached.keys == keys and len(keys) == 12
        np.testing.assert_array_equal(cached.labels, labels)
        np.testing.assert_allclose(cached.embeddings, embeddings, atol=1e-5)
        expected = retrieval_metrics(embeddings, labels)
        for name in ("rank1", "rank5", "mAP"):
            logged = run.data.metrics[f"retrieval/{cached.pooling}/{name}"]
            assert logged == pytest.approx(expected[name], abs=1e-6)
        assert run.data.metrics[f"retrieval/{cached.pooling}/queries"] == 12
    assert run.info.status == "FINISHED"

    # a re-run needs only the manifest: with the shards' images gone it must use the cache
    stamps = [p.stat().st_mtime_ns for p in files]
    for tar in (shards / "test").glob("*.tar"):
        tar.rename(tar.with_suffix(".hidden"))
    try:
        assert cli.main(argv) == 0
    finally:
        for hidden in (shards / "test").glob("*.hidden"):
            hidden.rename(hidden.with_suffix(".tar"))
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.parquet"))] == stamps


def test_fingerprint_follows_the_weights(shards, checkpoint):
    model = load_model(str(checkpoint))
    before = model_fingerprint(model)
    assert model_fingerprint(load_model(str(checkpoint))) == before
    with torch.no_grad():
        next(model.encoder_q.backbone.parameters())[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(model) != before


def test_probe_units_leave_the_encoder_unchanged_and_log_subsets(shards, checkpoint, tracking, tmp_path):
    model = load_model(str(checkpoint))
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # BN running statistics included
    setup = setup_for(model, shards, tmp_path / "cache")
    results, run_id = run_probes(setup, str(checkpoint), [1.0, 0.5, 0.2], seed=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())

    assert [(r.pooling, r.fraction) for r in results] == [
        (p, f) for p in ("attention", "gap") for f in (1.0, 0.5, 0.2)]
    train_keys = read_manifest(str(shards / "train")).total
    for r in results:
        assert r.train_images == 3 * per_class_count(6, r.fraction) == len(r.keys) <= train_keys
        assert 0.0 <= r.accuracy["top1"] <= r.accuracy["top5"] == 1.0  # 3 classes: top-5 holds them all
    run = tracking.get_run(run_id)
    assert run.data.metrics["probe/gap/top1_50pct"] == pytest.approx(results[4].accuracy["top1"])
    assert run.data.metrics["probe/train_images_20pct"] == 3
    logged = {a.path for a in tracking.list_artifacts(run_id, "probe")}
    assert logged == {"probe/subset_100pct.txt", "probe/subset_50pct.txt", "probe/subset_20pct.txt"}
    local = tracking.download_artifacts(run_id, "probe/subset_20pct.txt", str(tmp_path))
    assert Path(local).read_text().split() == results[2].keys

    # a unit on its own, from the cached features: the same subset and accuracy again
    again = probe_fraction(probe_features(setup)["attention"], 0.2, seed=3)
    assert again.keys == results[2].keys and again.accuracy == results[2].accuracy


def test_report_files_and_mlflow_artifacts(shards, checkpoint, tracking, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["report", "--model", str(checkpoint), "--shards", str(shards), "--out", str(out),
            "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--images", "4", "--projections", "2"]
    assert cli.main(argv) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for name in PNGS:
        with Image.open(out / name) as image:
            image.load()  # decodes the whole file
            assert image.format == "PNG" and min(image.size) > 50
        assert f'src="{name}"' in page
    run = last_run(tracking, "eval-test-report")
    logged = {a.path: a.file_size for a in tracking.list_artifacts(run.info.run_id, "report")}
    assert logged == {f"report/{name}": (out / name).stat().st_size for name in ("index.html", *PNGS)}


def test_steps_embedding_at_once_share_one_pass(shards, checkpoint, tmp_path, monkeypatch):
    """Parallel pipeline steps (three probes) ask for the same features: one embeds, the others wait
    for its cache file instead of each running the encoder."""
    passes, embed = [], features_module._embed

    def slow_embed(*args):
        passes.append(1)
        time.sleep(0.5)  # long enough for the other steps to arrive while it runs
        return embed(*args)

    monkeypatch.setattr(features_module, "_embed", slow_embed)
    model = load_model(str(checkpoint))
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        split_features(model, f"{shards}/test", ["gap"], batch_size=5, cache_dir=tmp_path)["gap"]))
        for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passes) == 1 and len(results) == 3
    assert all(np.array_equal(r.embeddings, results[0].embeddings) for r in results)


def test_the_pipelines_steps_log_into_one_run_and_summarise(shards, checkpoint, tracking, tmp_path):
    """As the pipeline does: retrieval, a probe per fraction (one after another, as parallel steps
    would) and the report all into the training run, then the summary from the steps' JSON."""
    setup = setup_for(load_model(str(checkpoint)), shards, tmp_path / "cache")
    run_id = tracking.create_run(tracking.create_experiment("pipeline-steps")).info.run_id
    retrieval = retrieve(setup, str(checkpoint), run_id)
    probes = [json.dumps([{"pooling": r.pooling, "fraction": r.fraction, "train_images": r.train_images,
                           "accuracy": r.accuracy} for r in run_probes(setup, str(checkpoint), [f], run_id=run_id)[0]])
              for f in (0.2, 1.0, 0.5)]
    page = report(setup, str(checkpoint), tmp_path / "report", run_id=run_id).html
    registration = json.dumps({"model": "m", "version": "3", "decision": "champion", "reason": "the first"})
    text = pipeline_summary("eval-test", run_id, json.dumps(retrieval.metrics), probes, registration, str(page))
    table = text.split("```")[1].strip().splitlines()
    assert table[0].split() == ["pooling", "rank-1", "rank-5", "mAP", "top-1/5", "@100%", "top-1/5", "@50%",
                                "top-1/5", "@20%"]
    assert [line.split()[0] for line in table[1:]] == ["attention", "gap", "chance"]
    assert float(table[1].split()[1]) == pytest.approx(100 * retrieval.metrics["attention"]["rank1"], abs=0.006)
    assert "m version 3: **champion** (the first)" in text and str(page) in text
    run = tracking.get_run(run_id)
    assert {f"probe/gap/top1_{p}pct" for p in (20, 50, 100)} | {"retrieval/attention/mAP"} <= set(run.data.metrics)
    assert run.data.tags[CHECKSUM_TAG] == manifest_checksum(read_manifest(f"{shards}/test"))
    assert {a.path for a in tracking.list_artifacts(run_id)} >= {"retrieval", "probe", "report"}


# ---------------------------------------------------------------------------------------------
# Bad input: one line, no traceback

def one_line_error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_wrong_architecture_checkpoint(shards, checkpoint, tmp_path, capsys):
    state = load_checkpoint(checkpoint)
    state["config"] = {**state["config"], "backbone": "resnet18"}  # tiny weights under a resnet18 config
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_checkpoint(wrong, state)
    err = one_line_error(["retrieve", "--model", str(wrong), "--shards", str(shards)], capsys)
    assert "do not fit the architecture" in err and str(wrong) in err


def test_attention_pooling_of_a_model_without_gfb(shards, tmp_path, capsys):
    moco = write_checkpoint(tmp_path / "moco", tiny_config(shards, variant="moco"))
    err = one_line_error(["retrieve", "--model", str(moco), "--pooling", "attention"], capsys)
    assert "has no GradCAM fitting branch" in err


def write_unlabelled_split(folder: Path, class_names: list[str]) -> None:
    """A test split whose samples have an image but no .cls, and its manifest."""
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buffer, "JPEG")
    with tarfile.open(folder / "test-000000.tar", "w") as tar:
        for i in range(4):
            info = tarfile.TarInfo(f"img{i}.jpg")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    size = (folder / "test-000000.tar").stat().st_size
    manifest = {"dataset": "unlabelled", "split": "test", "class_names": class_names, "total": 4,
                "tool_version": "test", "shards": [{"name": "test-000000.tar", "count": 4, "sha256": "0" * 64,
                                                    "bytes": size}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("class_names, message", [
    ([], "the manifest names no classes"),
    (["a", "b"], "none of its 4 samples has a decodable image and a label"),
])
def test_shards_without_labels(checkpoint, tmp_path, capsys, class_names, message):
    write_unlabelled_split(tmp_path / "unlabelled" / "test", class_names)
    err = one_line_error(["retrieve", "--model", str(checkpoint), "--shards", str(tmp_path / "unlabelled"),
                          "--cache-dir", str(tmp_path / "cache"), "--workers", "0"], capsys)
    assert message in err


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.2"])
def test_fraction_outside_the_unit_interval(shards, checkpoint, tmp_path, capsys, fraction):
    err = one_line_error(["probe", "--model", str(checkpoint), "--shards", str(shards), "--fractions", "1.0",
                          fraction, "--cache-dir", str(tmp_path / "cache")], capsys)
    assert f"label fraction {float(fraction)!r}: expected a number in (0, 1]" in err


def test_split_features_reads_back_what_it_wrote(shards, checkpoint, tmp_path):
    model = load_model(str(checkpoint))
    first = split_features(model, str(shards / "test"), ["gap"], workers=0, cache_dir=tmp_path)["gap"]
    second = split_features(model, str(shards / "test"), ["gap"], workers=0, cache_dir=tmp_path)["gap"]
    assert first.fingerprint == second.fingerprint and first.keys == second.keys
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    assert first.embeddings.dtype == np.float32 and np.allclose(np.linalg.norm(first.embeddings, axis=1), 1)
