"""`lcr register`: the encoder as an MLflow registered model version, promoted only when it is better.

    lcr register --model runs/lcr-demo --name lcr-cub --shards data/shards [--force]

The version is the pyfunc model of `components/encoder_model.py` (weights and config as artefacts; its
signature maps N x 3 x H x W float32 images to L2-normalised embeddings pooled the variant's test-time
way). An MLflow model with a signature (`models:/…`, `runs:/…`) is registered as it is; a checkpoint
is first logged with `tracking.log_encoder` into a new run.

Tags, written when the version is created (so other processes never see half of them): the variant,
the data set, the train and test manifests' checksums, and rank-1, rank-5 and mAP of leave-one-out
retrieval on `--shards`'s test split. A manifest's checksum is the sha256 of its canonical JSON
(`Manifest.to_json()`: the parsed fields, keys sorted), so reformatting the file changes nothing while
any shard's sha256 or count, or the class list, does. The figures are reused when the model's source
run already holds `retrieval/<pooling>/…` metrics and an `lcr.test_manifest_sha256` tag naming the same
test manifest; otherwise `lcr retrieve`'s code computes them (into the new run, or a run of its own).

Promotion. The alias `champion` is derived from the versions' creation tags, never from the order in
which processes happen to write: the baseline is the newest forced version, else the first version
`lcr register` evaluated; the contenders are the baseline and the later versions evaluated on its test
manifest; the champion is the contender with the highest rank-1, the earlier one on a tie (a version
must beat the champion to take the alias). Each `lcr register` writes the alias until a read shows it
on that champion, so two promotions racing for one name end with the better version as champion
whichever writes last (the last writer re-reads after its write and corrects a stale choice). A
contender that is not champion gets `challenger`; a version evaluated on other test shards is
registered without an alias and the command fails with the reason. `--force` makes the version the
baseline (champion regardless) and records who forced it and when. Every decision (both rank-1
figures, the checksum, the time) is written on the version's tags and description.
"""

from __future__ import annotations

import argparse
import getpass
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import mlflow
from mlflow.exceptions import MlflowException

from components import storage, tracking
from components.data import Manifest, read_manifest
from components.features import DEFAULT_CACHE_DIR, EvaluationSetup, add_loader_arguments, evaluation_setup
from components.retrieve import CHECKSUM_TAG, manifest_checksum, retrieve
from lcr_core.errors import LCRError
from lcr_core.model import LCRModel

CHAMPION, CHALLENGER = "champion", "challenger"
FIGURES = ("rank1", "rank5", "mAP")
TRAIN_CHECKSUM_TAG = "lcr.train_manifest_sha256"  # on a version: the train split its model was trained on
RANK1_TAG = "lcr.rank1"  # a version carrying it was evaluated by `lcr register`
FORCED_TAG = "lcr.forced_by"
MAX_ROUNDS = 20  # alias writes before giving up on a registry that keeps changing under us
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # usable as is in models:/NAME@champion


class RegistryError(LCRError):
    """A name, model or promotion the registry step refuses."""


@dataclass(frozen=True)
class Entry:
    """A registered version as `lcr register` tagged it at creation: what promotion decides on."""

    version: int
    rank1: float
    checksum: str
    forced: bool


@dataclass(frozen=True)
class Decision:
    kind: str  # champion, challenger or refused
    reason: str  # one line
    champion: Entry | None  # the champion when the decision settled
    previous: str | None  # the version the champion alias named before this registration


# ---------------------------------------------------------------------------------------------
# What is registered: the model, its checksums and figures

def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def train_checksum(model: LCRModel) -> str:
    """The checksum of the manifest the model was trained on; `unknown (…)` when it cannot be read
    (shards moved or deleted since), which must not stop the registration of a trained model."""
    try:
        return manifest_checksum(read_manifest(storage.join(model.cfg.shards, "train")))
    except LCRError as err:
        return f"unknown ({err})"


def registered_source(ref: str) -> tuple[str, str] | None:
    """(model URI, source run id) of an MLflow model logged with a signature (as `log_encoder` logs
    it), which is registered as it is; None for anything else, to be logged first."""
    if not ref.startswith(("runs:/", "models:/")):
        return None
    info = mlflow.models.get_model_info(ref)
    if info.signature is None:
        return None
    return (f"models:/{info.model_id}" if info.model_id else ref), info.run_id


@contextmanager
def new_run(model: LCRModel, ref: str, experiment: str | None) -> Iterator[str]:
    """A run `<run_name>-register` holding the configuration, ended FINISHED or FAILED with the block."""
    uri = tracking.tracking_uri()
    cfg = replace(model.cfg, run_name=f"{model.cfg.run_name}-register",
                  mlflow_experiment=experiment or model.cfg.mlflow_experiment)
    run_id = tracking.start_run(uri, cfg, {"lcr.step": "register", "lcr.model": tracking.without_credentials(ref)})
    succeeded = False
    try:
        tracking.MetricLogger(uri, run_id).log_params(tracking.config_params(model.cfg.to_dict()))
        yield run_id
        succeeded = True
    finally:
        tracking.end_run(uri, run_id, succeeded)


def logged_figures(run_id: str, pooling: str, checksum: str) -> dict[str, float] | None:
    """The run's retrieval figures if they were computed on the test manifest `checksum`."""
    run = mlflow.MlflowClient(tracking.tracking_uri()).get_run(run_id)
    names = {f"retrieval/{pooling}/{name}": name for name in FIGURES}
    if run.data.tags.get(CHECKSUM_TAG) != checksum or not names.keys() <= run.data.metrics.keys():
        return None
    return {name: run.data.metrics[key] for key, name in names.items()}


def evaluate(setup: EvaluationSetup, ref: str, checksum: str, source_run: str | None, own_run: str | None,
             experiment: str | None) -> tuple[dict[str, float], str, str]:
    """(figures, the run holding them, how they were obtained): reused from the source run when it
    has them for this test manifest, else computed by `lcr retrieve`'s code into our own run (a new
    one when the model comes from another step's run, whose parameters must not change), which is
    tagged with the checksum."""
    pooling = setup.poolings[0]
    if source_run and (figures := logged_figures(source_run, pooling, checksum)):
        return figures, source_run, "reused"
    result = retrieve(setup, tracking.without_credentials(ref), own_run, experiment)  # tags the checksum
    return {name: float(result.metrics[pooling][name]) for name in FIGURES}, result.mlflow_run_id, "computed"


# ---------------------------------------------------------------------------------------------
# Promotion

def entries(client: mlflow.MlflowClient, name: str) -> dict[int, Entry]:
    """Every version of `name` that `lcr register` evaluated, from its creation tags."""
    found, token = {}, None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        for v in page:
            if RANK1_TAG in v.tags:
                found[int(v.version)] = Entry(int(v.version), float(v.tags[RANK1_TAG]), v.tags.get(CHECKSUM_TAG, ""),
                                              FORCED_TAG in v.tags)
        token = page.token
        if not token:
            return found


def baseline(found: dict[int, Entry]) -> Entry:
    """The newest forced version, else the first evaluated one: it fixes the test manifest."""
    forced = [e for e in found.values() if e.forced]
    return max(forced, key=lambda e: e.version) if forced else found[min(found)]


def contenders(found: dict[int, Entry]) -> list[Entry]:
    base = baseline(found)
    return [e for e in found.values() if e.version >= base.version and e.checksum == base.checksum]


def best(found: dict[int, Entry]) -> Entry:
    """Highest rank-1; on a tie the earlier version, which the later one did not beat."""
    return max(contenders(found), key=lambda e: (e.rank1, -e.version))


def aliases(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    # A tracking server answers "1"; a client on the database itself (sqlite:///…) answers 1.
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def settle(client: mlflow.MlflowClient, name: str) -> dict[int, Entry]:
    """Write `champion` until a read finds it on the best contender; returns that read's versions.
    Reading after every write is what makes racing promotions converge: whoever writes last sees
    every version evaluated before its read and corrects a choice made from an older read."""
    for _ in range(MAX_ROUNDS):
        found = entries(client, name)
        target = str(best(found).version)
        if aliases(client, name).get(CHAMPION) == target:
            return found
        set_alias(client, name, CHAMPION, target)
    raise RegistryError(f"model {name}: the {CHAMPION} alias did not settle after {MAX_ROUNDS} writes; "
                        "expected other registrations to finish (run again)")


def figure(entry: Entry) -> str:
    return f"version {entry.version}'s rank-1 {entry.rank1:.4f} on test manifest sha256 {entry.checksum[:12]}…"


def before(found: dict[int, Entry], previous: str | None, own: Entry) -> str:
    """What the champion alias named when this registration began, in words."""
    if previous is None:
        return "no champion before it"
    if previous == str(own.version):
        return "the alias named it already (a concurrent registration settled it)"
    if int(previous) in found:
        return figure(found[int(previous)])
    return f"version {previous}, which lcr register did not evaluate"


def decide(own: Entry, found: dict[int, Entry], previous: str | None) -> Decision:
    """The decision for `own` once the alias settled on `best(found)`, with a one-line reason that
    gives both rank-1 figures and their test manifests."""
    champion, base = best(found), baseline(found)
    if own == champion:
        prior = before(found, previous, own)
        if own.forced:
            why = f"forced, champion regardless: {figure(own)}; before it {prior}"
        elif previous in (None, str(own.version)):
            why = f"{figure(own)}; {prior}"
        else:
            why = f"{figure(own)} beats {prior}"
        return Decision(CHAMPION, f"{CHAMPION}: {why}", champion, previous)
    if own in contenders(found):
        why = f"{figure(own)} does not beat the {CHAMPION} {figure(champion)}"
        return Decision(CHALLENGER, f"{CHALLENGER}: {why}", champion, previous)
    if own.checksum != base.checksum:
        why = (f"evaluated on other test shards than the {CHAMPION}: {figure(own)}, the {CHAMPION} "
               f"{figure(champion)}; registered without an alias (evaluate on the {CHAMPION}'s test shards, "
               "or use --force)")
    else:
        why = (f"{figure(own)}, but version {base.version} was forced {CHAMPION} meanwhile (the {CHAMPION} "
               f"{figure(champion)}); registered without an alias")
    return Decision("refused", f"refused: {why}", champion, previous)


def promote(client: mlflow.MlflowClient, name: str, version: str) -> Decision:
    """Settle the champion, then name `version` challenger if it is a contender that lost. A
    champion alias set by hand on a version `lcr register` never evaluated is left alone."""
    previous = aliases(client, name).get(CHAMPION)
    found = entries(client, name)
    own = found[int(version)]
    if previous is not None and int(previous) not in found and not own.forced:
        reason = (f"refused: the {CHAMPION} alias names version {previous}, which lcr register did not "
                  "evaluate (set by hand?); registered without an alias (use --force to replace it)")
        return Decision("refused", reason, None, previous)
    found = settle(client, name)
    decision = decide(own, found, previous)
    if decision.kind == CHALLENGER:
        for _ in range(MAX_ROUNDS):
            if set_alias(client, name, CHALLENGER, version):
                break
    return decision


def set_alias(client: mlflow.MlflowClient, name: str, alias: str, version: str) -> bool:
    """Point `alias` at `version`; False when another process wrote the same alias at that moment
    (MLflow's SQLite store replaces an alias in two statements, and the second writer then breaks a
    UNIQUE constraint): the caller reads again and decides anew."""
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        if "UNIQUE constraint" not in str(err) and err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Tags and description

def evaluation_tags(model: LCRModel, shards: str, test: Manifest, figures: dict[str, float],
                    evaluated: tuple[str, str, str], force: bool) -> dict[str, str]:
    """What the version is and how it scores; written at creation, so promotion can rely on them."""
    run_id, how, source_run = evaluated
    tags = {"lcr.variant": model.cfg.variant, "lcr.dataset": test.dataset, "lcr.pooling": model.cfg.test_pooling,
            "lcr.test_shards": tracking.without_credentials(shards), CHECKSUM_TAG: manifest_checksum(test),
            TRAIN_CHECKSUM_TAG: train_checksum(model), "lcr.test_queries": str(test.total),
            "lcr.figures": how, "lcr.evaluation_run": run_id, "lcr.source_run": source_run,
            **{f"lcr.{name}": repr(value) for name, value in figures.items()}}
    if force:
        tags |= {FORCED_TAG: getpass.getuser(), "lcr.forced_at": now()}
    return tags


def decision_tags(decision: Decision, when: str) -> dict[str, str]:
    champion = decision.champion
    return {"lcr.decision": decision.kind, "lcr.decision_reason": decision.reason, "lcr.decided_at": when,
            "lcr.previous_champion": decision.previous or "none",
            "lcr.champion_version": str(champion.version) if champion else "none",
            "lcr.champion_rank1": repr(champion.rank1) if champion else "none",
            "lcr.champion_test_manifest_sha256": champion.checksum if champion else "none"}


def description(tags: dict[str, str], decision: Decision, when: str) -> str:
    figures = ", ".join(f"{name} {float(tags[f'lcr.{name}']):.4f}" for name in FIGURES)
    forced = f"\nForced by {tags[FORCED_TAG]} at {tags['lcr.forced_at']}." if FORCED_TAG in tags else ""
    return (f"{tags['lcr.variant']} encoder ({tags['lcr.pooling']} pooling), {tags['lcr.dataset']}: {figures} "
            f"on {tags['lcr.test_queries']} test images, test manifest sha256 {tags[CHECKSUM_TAG]}.\n"
            f"{when}: {decision.reason}.{forced}")


def record(client: mlflow.MlflowClient, name: str, version: str, tags: dict[str, str], decision: Decision) -> None:
    when = now()
    for key, value in decision_tags(decision, when).items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description(tags, decision, when))


# ---------------------------------------------------------------------------------------------
# The step

@dataclass
class Registration:
    version: str
    decision: Decision
    tags: dict[str, str]


def register(ref: str, name: str, shards: str | None = None, *, force: bool = False, batch_size: int = 64,
             workers: int | None = None, cache_dir: str = DEFAULT_CACHE_DIR,
             experiment: str | None = None) -> Registration:
    """Register the encoder `ref` as a version of `name`, evaluated on `shards`'s test split, and promote
    it by the rules above. A refused version stays registered (its tags say why) and this raises."""
    if not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"--name {name!r}: expected letters, digits, '.', '_' or '-' (it goes into "
                            "models:/NAME@champion)")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    setup = evaluation_setup(ref, shards, None, batch_size, workers, cache_dir)
    setup = replace(setup, poolings=[setup.model.cfg.test_pooling])  # what the registered pyfunc serves
    test = read_manifest(storage.join(setup.shards, "test"))
    client = mlflow.MlflowClient(tracking.tracking_uri())
    with registry_errors(name):
        version, tags = create_version(setup, ref, name, test, force, experiment)
        decision = promote(client, name, version)
        record(client, name, version, tags, decision)
    if decision.kind == "refused":
        raise RegistryError(f"model {name} version {version}: {decision.reason}")
    return Registration(version, decision, tags)


def create_version(setup: EvaluationSetup, ref: str, name: str, test: Manifest, force: bool,
                   experiment: str | None) -> tuple[str, dict[str, str]]:
    """Evaluate and register; a checkpoint is logged into a new run first, which also holds the figures."""
    checksum = manifest_checksum(test)
    found = registered_source(ref)
    if found:
        model_uri, source_run = found
        figures, run_id, how = evaluate(setup, ref, checksum, source_run, None, experiment)
        return _register(model_uri, name, setup, test, figures, (run_id, how, source_run), force)
    with new_run(setup.model, ref, experiment) as source_run:
        model_uri = tracking.log_encoder(tracking.tracking_uri(), source_run, setup.model.state_dict(), setup.model.cfg)
        figures, run_id, how = evaluate(setup, ref, checksum, None, source_run, experiment)
    return _register(model_uri, name, setup, test, figures, (run_id, how, source_run), force)


def _register(model_uri: str, name: str, setup: EvaluationSetup, test: Manifest, figures: dict[str, float],
              evaluated: tuple[str, str, str], force: bool) -> tuple[str, dict[str, str]]:
    tags = evaluation_tags(setup.model, setup.shards, test, figures, evaluated, force)
    return str(mlflow.register_model(model_uri, name, tags=tags).version), tags


@contextmanager
def registry_errors(name: str) -> Iterator[None]:
    """MLflow's failures (server down, permission) as one line naming the model."""
    try:
        yield
    except MlflowException as err:
        raise RegistryError(f"model {name}: the MLflow registry refused ({str(err).strip().splitlines()[0]})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a checkpoint (file or folder, local or s3://), a run folder such as runs/NAME, "
                             "or an MLflow model (runs:/ID/encoder, models:/m-ID, models:/NAME@ALIAS)")
    parser.add_argument("--name", required=True, help="the registered model's name")
    parser.add_argument("--shards", help="folder or s3://bucket/prefix holding the test/ split to evaluate on "
                                         "(default: the shards the model was trained on)")
    parser.add_argument("--force", action="store_true",
                        help="make this version champion regardless of its figures (recorded with your user name)")
    add_loader_arguments(parser)
    parser.add_argument("--experiment", help="MLflow experiment of the runs (default: the model's mlflow_experiment)")


def run(args: argparse.Namespace) -> int:
    result = register(args.model, args.name, args.shards, force=args.force, batch_size=args.batch_size,
                      workers=args.workers, cache_dir=args.cache_dir, experiment=args.experiment)
    print(f"model {args.name} version {result.version}: {result.decision.reason}")
    print(f"serve the champion: mlflow models serve -m models:/{args.name}@{CHAMPION} --env-manager local")
    return 0
