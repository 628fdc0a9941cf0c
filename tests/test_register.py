"""`lcr register` against a real `mlflow server`: gated promotion, racing promotions, serving the champion.

The encoders are untrained tiny networks drawn from different seeds; their retrieval figures differ
and are the real computed ones (the fixture computes them offline to know which model is better)."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from components import cli, register, tracking
from components.data import read_manifest
from components.features import EvaluationSetup, load_model, split_features
from components.retrieve import evaluate_retrieval
from components.shards import build_shards
from tests.services import free_port, stop, wait_http
from tests.test_evaluate import tiny_config, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SPEC = {"num_classes": 4, "train_per_class": 2, "test_per_class": 6, "image_size": 32}
SEEDS = range(6)
EXPERIMENT = "register-tests"
FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIALCRFAKEREGISTER", "AWS_SECRET_ACCESS_KEY": "lcr-fake-secret-register",
                "AWS_SESSION_TOKEN": "lcr-fake-token-register"}


@pytest.fixture(scope="module", autouse=True)
def environment(mlflow_server):
    """Every test (and every subprocess) talks to the server, with credentials in the environment
    that must never reach the store."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        for name, value in FAKE_SECRETS.items():
            patch.setenv(name, value)
        tracking.prepare_experiment(mlflow_server, EXPERIMENT)  # before processes race to create it
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Two data sets of one spec: the same classes, other images (so another test manifest)."""
    root = tmp_path_factory.mktemp("shards")
    for seed in (0, 1):
        build_shards("synthetic", str(root / f"seed{seed}"), options={**SPEC, "seed": seed}, maxcount=50,
                     progress=False)
    return {"main": root / "seed0", "other": root / "seed1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def ranked(shards, cache, tmp_path_factory) -> list[tuple[Path, float]]:
    """(checkpoint, rank-1 on the main test split) of three encoders, worst first, no two equal."""
    cfg = tiny_config(shards["main"], image_size=32, eval_resize=32, run_name="reg", mlflow_experiment=EXPERIMENT)
    root, by_rank1 = tmp_path_factory.mktemp("checkpoints"), {}
    for seed in SEEDS:
        path = write_checkpoint(root / f"seed{seed}", cfg, seed)
        features = split_features(load_model(str(path)), str(shards["main"] / "test"), ["attention"],
                                  workers=0, cache_dir=cache)["attention"]
        by_rank1.setdefault(evaluate_retrieval(features)["rank1"], path)
    assert len(by_rank1) >= 3, f"seeds {list(SEEDS)} give too few distinct rank-1 figures: {by_rank1}"
    order = sorted(by_rank1)
    return [(by_rank1[r], r) for r in (order[0], order[len(order) // 2], order[-1])]


@pytest.fixture
def client(mlflow_server) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(mlflow_server)


def lcr_register(model: Path | str, name: str, shards: Path, cache: Path, *extra: str) -> list[str]:
    return ["register", "--model", str(model), "--name", name, "--shards", str(shards), "--workers", "0",
            "--cache-dir", str(cache), *extra]


def registered(model: Path | str, name: str, shards: Path, cache: Path) -> register.Registration:
    return register.register(str(model), name, str(shards), workers=0, cache_dir=str(cache))


def champion(client: mlflow.MlflowClient, name: str) -> str:
    return client.get_registered_model(name).aliases.get("champion")


def tags_of(client: mlflow.MlflowClient, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


# ---------------------------------------------------------------------------------------------
# Gated promotion

def test_first_is_champion_a_worse_one_challenger_a_better_one_takes_over(ranked, shards, cache, client):
    (worst, worst_rank1), (mid, mid_rank1), (best, best_rank1) = ranked
    checksum = register.manifest_checksum(read_manifest(str(shards["main"] / "test")))

    first = registered(mid, "gate", shards["main"], cache)
    assert first.decision.kind == "champion" and champion(client, "gate") == first.version
    tags = tags_of(client, "gate", first.version)
    assert float(tags["lcr.rank1"]) == pytest.approx(mid_rank1)
    assert tags["lcr.test_manifest_sha256"] == checksum and tags["lcr.previous_champion"] == "none"
    assert tags["lcr.variant"] == "lcr" and tags["lcr.dataset"] == "synthetic" and tags["lcr.pooling"] == "attention"
    train = read_manifest(str(shards["main"] / "train"))
    assert tags["lcr.train_manifest_sha256"] == register.manifest_checksum(train)
    assert {"lcr.rank5", "lcr.mAP", "lcr.decided_at"} <= tags.keys() and tags["lcr.figures"] == "computed"
    logged = client.get_run(tags["lcr.evaluation_run"]).data.metrics
    assert logged["retrieval/attention/rank1"] == float(tags["lcr.rank1"])

    worse = registered(worst, "gate", shards["main"], cache)
    assert worse.decision.kind == "challenger"
    aliases = client.get_registered_model("gate").aliases
    assert aliases == {"champion": first.version, "challenger": worse.version}
    tags = tags_of(client, "gate", worse.version)
    assert float(tags["lcr.rank1"]) == pytest.approx(worst_rank1)
    assert float(tags["lcr.champion_rank1"]) == pytest.approx(mid_rank1) and tags["lcr.champion_version"] == "1"
    description = client.get_model_version("gate", worse.version).description
    assert "challenger" in description and f"{worst_rank1:.4f}" in description and f"{mid_rank1:.4f}" in description

    better = registered(best, "gate", shards["main"], cache)
    assert better.decision.kind == "champion" and champion(client, "gate") == better.version
    tags = tags_of(client, "gate", better.version)
    assert tags["lcr.previous_champion"] == first.version
    assert f"beats version {first.version}'s rank-1 {mid_rank1:.4f}" in tags["lcr.decision_reason"]
    assert checksum[:12] in tags["lcr.decision_reason"]
    # nothing on the earlier versions was overwritten
    assert tags_of(client, "gate", first.version)["lcr.decision"] == "champion"


def test_other_test_shards_are_refused_and_force_is_recorded(ranked, shards, cache, client, capsys):
    (worst, _), (mid, _), (best, _) = ranked
    registered(mid, "gate-shards", shards["main"], cache)

    assert cli.main(lcr_register(best, "gate-shards", shards["other"], cache)) == 2
    err = capsys.readouterr().err  # MLflow's download progress bars come first
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert err.startswith("lcr register: error: model gate-shards version 2: refused")
    assert "refused: evaluated on other test shards than the champion" in err and "without an alias" in err
    other = register.manifest_checksum(read_manifest(str(shards["other"] / "test")))
    assert other[:12] in err and "version 1's rank-1" in err
    versions = client.search_model_versions("name = 'gate-shards'")
    refused = max(versions, key=lambda v: int(v.version))
    assert refused.version == "2" and refused.aliases == [] and refused.tags["lcr.decision"] == "refused"
    assert "refused" in refused.description
    assert client.get_registered_model("gate-shards").aliases == {"champion": "1"}

    assert cli.main(lcr_register(worst, "gate-shards", shards["other"], cache, "--force")) == 0
    assert "forced" in capsys.readouterr().out
    assert champion(client, "gate-shards") == "3"
    tags = tags_of(client, "gate-shards", "3")
    assert tags["lcr.forced_by"] == getpass.getuser() and tags["lcr.forced_at"] <= tags["lcr.decided_at"]
    assert tags["lcr.previous_champion"] == "1"

    # the forced version is the new baseline: the main shards are now the other ones
    assert registered(best, "gate-shards", shards["other"], cache).decision.kind in ("champion", "challenger")
    with pytest.raises(register.RegistryError, match="refused: evaluated on other test shards"):
        registered(best, "gate-shards", shards["main"], cache)


def test_a_champion_set_by_hand_is_left_alone(ranked, shards, cache, client, mlflow_server):
    """A model logged by another step (as `lcr pretrain` logs it): registered as it is, its figures
    computed into a run of their own, and a hand-set champion alias not replaced without --force."""
    checkpoint = ranked[0][0]
    model = load_model(str(checkpoint))
    run_id = tracking.start_run(mlflow_server, model.cfg, {"lcr.step": "pretrain"})
    model_uri = tracking.log_encoder(mlflow_server, run_id, model.state_dict(), model.cfg)
    tracking.end_run(mlflow_server, run_id, succeeded=True)
    by_hand = mlflow.register_model(model_uri, "hand-set")
    client.set_registered_model_alias("hand-set", "champion", by_hand.version)

    with pytest.raises(register.RegistryError, match="alias names version 1, which lcr register did not evaluate"):
        registered(model_uri, "hand-set", shards["main"], cache)
    assert champion(client, "hand-set") == "1"
    tags = tags_of(client, "hand-set", "2")
    assert tags["lcr.decision"] == "refused" and tags["lcr.figures"] == "computed"
    assert tags["lcr.source_run"] == run_id != tags["lcr.evaluation_run"]
    assert client.get_run(run_id).data.params == {}  # the other step's run is left as it was
    assert client.get_model_version("hand-set", "2").source == model_uri


def test_a_bad_name_is_one_line(capsys):
    assert cli.main(["register", "--model", "x", "--name", "a/b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcr register: error: --name 'a/b'") and "\n" not in err


# ---------------------------------------------------------------------------------------------
# Racing promotions

class StaleClient(mlflow.MlflowClient):
    """Runs `interleave` just before its first alias write: the write then carries a choice made
    from a read that missed whatever `interleave` registered."""

    def __init__(self, uri: str, interleave):
        super().__init__(uri)
        self.interleave, self.writes = interleave, []

    def set_registered_model_alias(self, name, alias, version):
        if self.interleave:
            interleave, self.interleave = self.interleave, None
            interleave()
        self.writes.append((alias, version))
        super().set_registered_model_alias(name, alias, version)


def test_a_promotion_written_from_a_stale_read_is_corrected(ranked, shards, cache, client, mlflow_server):
    (worst, _), _, (best, _) = ranked
    model = load_model(str(worst))
    setup = EvaluationSetup(model, str(shards["main"]), ["attention"], 64, 0, str(cache))
    test = read_manifest(str(shards["main"] / "test"))
    worse, _ = register.create_version(setup, str(worst), "race-stale", test, False, None)
    done = {}

    def register_the_better_one() -> None:
        done["better"] = registered(best, "race-stale", shards["main"], cache)

    stale = StaleClient(mlflow_server, register_the_better_one)

    decision = register.promote(stale, "race-stale", worse)
    better = done["better"]
    assert better.decision.kind == "champion"  # it saw no champion and took the alias ...
    assert stale.writes[:2] == [("champion", worse), ("champion", better.version)]  # ... then lost it, then won
    assert decision.kind == "challenger" and decision.champion.version == int(better.version)
    assert champion(client, "race-stale") == better.version


@pytest.mark.parametrize("better_first", [False, True])
def test_two_processes_racing_end_with_the_better_champion(ranked, shards, cache, client, tmp_path, better_first):
    """Two `lcr register` processes started together on one name, in either order."""
    (worst, _), _, (best, best_rank1) = ranked
    name = f"race-{int(better_first)}"
    models = (best, worst) if better_first else (worst, best)
    logs = [open(tmp_path / f"register-{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([str(VENV_BIN / "lcr"), *lcr_register(model, name, shards["main"], cache)],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
             for model, log in zip(models, logs)]
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    # both succeed: two alias writes at the same moment once broke MLflow's SQLite UNIQUE constraint
    assert codes == [0, 0], "\n---\n".join(output[-1500:] for output in outputs)
    winner = tags_of(client, name, champion(client, name))
    assert float(winner["lcr.rank1"]) == pytest.approx(best_rank1) and winner["lcr.decision"] == "champion"
    decisions = {v.tags["lcr.decision"] for v in client.search_model_versions(f"name = '{name}'")}
    assert decisions <= {"champion", "challenger"}  # the worse one may have been champion until the better came


# ---------------------------------------------------------------------------------------------
# Using the champion

@pytest.fixture(scope="module")
def served(ranked, shards, cache) -> tuple[str, torch.nn.Module]:
    """A registered champion and the offline model it came from."""
    checkpoint = ranked[-1][0]
    registered(checkpoint, "served", shards["main"], cache)
    return "served", load_model(str(checkpoint))


def images(n: int) -> np.ndarray:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7)).numpy()


def offline(model, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.embed(torch.from_numpy(batch)).numpy()


def test_the_champion_loads_as_a_pyfunc_and_its_figures_are_reused(served, shards, cache, client):
    name, model = served
    batch = images(5)
    predicted = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(batch)
    assert predicted.dtype == np.float32 and predicted.shape[0] == 5
    np.testing.assert_allclose(np.linalg.norm(predicted, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(predicted, offline(model, batch), atol=1e-5)
    signature = mlflow.models.get_model_info(f"models:/{name}@champion").signature
    assert signature.inputs.inputs[0].shape == (-1, 3, 32, 32)

    # registering the MLflow model elsewhere registers the same model, with the figures of its run
    copy = registered(f"models:/{name}@champion", "served-copy", shards["main"], cache)
    source = client.get_model_version(name, champion(client, name))
    tags = tags_of(client, "served-copy", copy.version)
    assert tags["lcr.figures"] == "reused" and tags["lcr.evaluation_run"] == source.tags["lcr.evaluation_run"]
    assert tags["lcr.rank1"] == source.tags["lcr.rank1"]
    assert source.source.startswith("models:/m-")
    assert client.get_model_version("served-copy", copy.version).source == source.source


def test_mlflow_models_serve_answers_with_the_embeddings(served, mlflow_server, tmp_path):
    """As a user runs it in the activated venv: the server execs `uvicorn` found on PATH."""
    name, model = served
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    batch = images(3)
    try:
        wait_http(url + "/ping", 180, proc)
        request = urllib.request.Request(url + "/invocations", json.dumps({"inputs": batch.tolist()}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = np.asarray(json.load(answer)["predictions"], dtype=np.float32)
    finally:
        stop(proc)
        log.close()
    np.testing.assert_allclose(np.linalg.norm(predictions, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(predictions, offline(model, batch), atol=1e-5)


def test_no_credential_reaches_the_store(served, client):
    """Everything this module wrote (runs' params and tags, versions' tags and descriptions), read back."""
    texts = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            texts += [*run.data.params.items(), *run.data.tags.items()]
    for model in client.search_registered_models():
        texts += [model.description or "", *model.tags.items()]
        for version in client.search_model_versions(f"name = '{model.name}'"):
            texts += [version.description or "", version.source, *version.tags.items()]
    blob = json.dumps(texts)
    assert len(texts) > 50 and "lcr.rank1" in blob
    for secret in FAKE_SECRETS.values():
        assert secret not in blob
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRETS["AWS_SECRET_ACCESS_KEY"]  # they were set



class CollidingClient(mlflow.MlflowClient):
    """Its first alias write meets the error MLflow's SQLite store gives when another process writes the
    same alias at that moment (seen in the two-process race under load)."""

    collided = False

    def set_registered_model_alias(self, name, alias, version):
        if not self.collided:
            self.collided = True
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.name",
                                  error_code=BAD_REQUEST)
        return super().set_registered_model_alias(name, alias, version)


def test_an_alias_write_colliding_with_another_process_is_read_again_and_retried(ranked, shards, cache, client,
                                                                                 mlflow_server):
    (worst, _), _, _ = ranked
    setup = EvaluationSetup(load_model(str(worst)), str(shards["main"]), ["attention"], 64, 0, str(cache))
    version, _ = register.create_version(setup, str(worst), "race-collide", read_manifest(str(shards["main"] / "test")),
                                         False, None)
    colliding = CollidingClient(mlflow_server)
    assert register.promote(colliding, "race-collide", version).kind == "champion" and colliding.collided
    assert champion(client, "race-collide") == version
