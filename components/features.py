"""What the evaluation steps share: the trained encoder, its features of a split (cached), the MLflow run.

Features are embedded once per (model, pooling, split) and cached as Parquet: one file per
fingerprint, holding each sample's key, label and embedding, so that `lcr retrieve`, `lcr probe` and
`lcr report` re-run without touching the encoder. The fingerprint hashes the encoder's weights and
configuration, the pooling and the split's manifest (which lists every shard's sha256), so a changed
model or changed shards never reuse stale features.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components import storage, tracking
from components.data import Manifest, eval_loader, read_manifest
from lcr_core.config import load_config
from lcr_core.errors import LCRError
from lcr_core.model import LCRModel, build_model
from lcr_core.train import extract_embeddings

CACHE_FORMAT = 1  # bump when the file layout or the embedding computation changes
DEFAULT_CACHE_DIR = ".lcr-cache/features"
POOLINGS = ("attention", "gap", "bilinear")
INIT_PREFIX = "init:"  # `init:CONFIG?FIELD=VALUE&...`: the untrained network, a baseline


class EvaluationError(LCRError):
    """An encoder, split or option the evaluation steps cannot work with."""


@dataclass
class Features:
    """One split embedded with one pooling, rows in the split's reading order."""

    keys: list[str]
    labels: np.ndarray  # (N,) int64
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    class_names: list[str]
    pooling: str
    fingerprint: str


# ---------------------------------------------------------------------------------------------
# The encoder

def load_model(ref: str) -> LCRModel:
    """The model in eval mode: trained, from a checkpoint (file, folder, run folder; local or s3://) or
    an MLflow model URI, or untrained (`init:CONFIG`)."""
    if ref.startswith(INIT_PREFIX):
        return initial_model(ref)
    try:
        model = tracking.load_encoder(ref)
    except RuntimeError as err:  # load_state_dict: the weights belong to another architecture
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise EvaluationError(f"model {ref}: its weights do not fit the architecture its config names "
                              f"({detail[:160]}); expected a checkpoint written by `lcr pretrain`") from None
    return model.eval()


def initial_model(ref: str) -> LCRModel:
    """`init:CONFIG?FIELD=VALUE&FIELD=VALUE`: the network a run of that config starts from, with no
    training, to measure what the training adds. Its weights are drawn from the config's seed, so a
    reference always gives the same model (and reuses its cached features)."""
    name, _, query = ref[len(INIT_PREFIX):].partition("?")
    if not name:
        raise EvaluationError(f"model {ref}: expected init:CONFIG (a shipped config or a YAML file), "
                              "optionally followed by ?FIELD=VALUE&FIELD=VALUE")
    try:
        cfg = load_config(name, [item for item in query.split("&") if item])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_model(replace(cfg, run_name=f"{cfg.run_name}-init"))
    except LCRError as err:
        raise EvaluationError(f"model {ref}: {err}") from None
    return model.eval()


def check_poolings(model: LCRModel, poolings: list[str]) -> list[str]:
    """The poolings without repeats, each one the model can compute."""
    for pooling in poolings:
        if pooling not in POOLINGS:
            raise EvaluationError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        if pooling != "gap" and model.encoder_q.gfb is None:
            raise EvaluationError(f"pooling {pooling!r}: the {model.cfg.variant!r} model has no GradCAM "
                                  "fitting branch; expected gap")
    return list(dict.fromkeys(poolings))


def default_poolings(model: LCRModel) -> list[str]:
    """The variant's own test-time pooling next to plain GAP from the same weights."""
    return list(dict.fromkeys([model.cfg.test_pooling, "gap"]))


def model_fingerprint(model: LCRModel) -> str:
    """sha256 of the query encoder's weights (what embeddings depend on) and the run's configuration."""
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.encoder_q.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def features_fingerprint(model_hash: str, pooling: str, manifest: Manifest) -> str:
    text = json.dumps([CACHE_FORMAT, model_hash, pooling, manifest.to_json()])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# The Parquet cache

def write_features(features: Features, path: Path) -> None:
    """Atomically (a finished file or none): parallel pipeline steps may look for it at any time."""
    dim = features.embeddings.shape[1]
    table = pa.table({
        "key": pa.array(features.keys, pa.string()),
        "label": pa.array(features.labels, pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(features.embeddings.astype(np.float32).ravel(), pa.float32()), dim),
    })
    meta = {"pooling": features.pooling, "fingerprint": features.fingerprint,
            "class_names": features.class_names, "format": CACHE_FORMAT}
    table = table.replace_schema_metadata({"lcr": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def read_features(path: Path) -> Features:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"lcr"])
    column = table.column("embedding").combine_chunks()
    # copies: Arrow's zero-copy arrays are read-only, which torch.from_numpy warns about
    embeddings = column.flatten().to_numpy().reshape(len(table), column.type.list_size).copy()
    return Features(keys=table.column("key").to_pylist(), labels=table.column("label").to_numpy().copy(),
                    embeddings=embeddings, class_names=meta["class_names"], pooling=meta["pooling"],
                    fingerprint=meta["fingerprint"])


class _KeyRecorder:
    """The loader's (images, labels, keys) batches, passed on with their keys noted; sized for tqdm."""

    def __init__(self, batches: Iterable, length: int):
        self.batches, self.length, self.keys = batches, length, []

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            self.keys.extend(batch[2])
            yield batch


def split_features(model: LCRModel, split_uri: str, poolings: list[str], *, batch_size: int = 64,
                   workers: int = 0, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                   model_hash: str | None = None) -> dict[str, Features]:
    """{pooling: Features} of every sample of the split, from the cache or one pass of the encoder."""
    manifest = read_manifest(split_uri)
    if not manifest.class_names:
        raise EvaluationError(f"{split_uri}: the manifest names no classes; expected labelled shards "
                              "(each sample a {key}.jpg and a {key}.cls)")
    model_hash = model_hash or model_fingerprint(model)
    paths = {p: Path(cache_dir, features_fingerprint(model_hash, p, manifest) + ".parquet") for p in poolings}
    found = {p: read_features(path) for p, path in paths.items() if path.is_file()}
    if len(found) < len(poolings):
        # Steps running at once (the pipeline's probes) wait for one pass instead of each making its own.
        with cache_lock(Path(cache_dir), model_hash):
            found = {p: read_features(path) for p, path in paths.items() if path.is_file()}
            missing = [p for p in poolings if p not in found]
            if missing:
                found.update(_embed(model, split_uri, manifest, missing, paths, batch_size, workers))
    return {p: found[p] for p in poolings}


@contextmanager
def cache_lock(cache_dir: Path, model_hash: str) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{model_hash}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _embed(model: LCRModel, split_uri: str, manifest: Manifest, poolings: list[str], paths: dict[str, Path],
           batch_size: int, workers: int) -> dict[str, Features]:
    cfg = model.cfg
    loader = eval_loader(split_uri, cfg.image_size, cfg.eval_resize, batch_size, workers)
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise EvaluationError(f"{split_uri}: none of its {manifest.total} samples has a decodable image "
                              f"and a label ({loader.skipped} skipped); expected {{key}}.jpg and {{key}}.cls")
    recorder = _KeyRecorder(itertools.chain([first], batches), len(loader))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    embeddings, labels = extract_embeddings(model.to(device), recorder, poolings, device,
                                            progress=f"embedding {storage.name_of(split_uri)}")
    labels = labels.numpy().astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(manifest.class_names):
        raise EvaluationError(f"{split_uri}: labels span {labels.min()}..{labels.max()}; expected "
                              f"0..{len(manifest.class_names) - 1} (the manifest's classes)")
    result = {}
    for pooling in poolings:
        result[pooling] = Features(recorder.keys, labels, embeddings[pooling].numpy(), manifest.class_names,
                                   pooling, paths[pooling].stem)
        write_features(result[pooling], paths[pooling])
    return result


# ---------------------------------------------------------------------------------------------
# Command line and MLflow, shared by the steps

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a checkpoint (file or folder, local or s3://), a run folder such as runs/NAME "
                             "(its newest intact checkpoint), runs:/ID/encoder, models:/NAME@ALIAS, or "
                             "init:CONFIG[?FIELD=VALUE&FIELD=VALUE] for the untrained network of a config, "
                             "e.g. 'init:demo?backbone_weights=null' (quote it for the shell)")
    parser.add_argument("--shards", help="folder or s3://bucket/prefix holding train/ and test/ "
                                         "(default: the shards the model was trained on)")
    parser.add_argument("--pooling", nargs="+", choices=POOLINGS,
                        help="embeddings to evaluate (default: the variant's test-time pooling and gap)")
    add_loader_arguments(parser)
    parser.add_argument("--experiment", help="MLflow experiment (default: the model's mlflow_experiment)")
    parser.add_argument("--run-id", help="log into this MLflow run instead of a new one")


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader processes (default: the config's loader_workers)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where features are cached as Parquet")


@dataclass
class EvaluationSetup:
    model: LCRModel
    shards: str
    poolings: list[str]
    batch_size: int
    workers: int
    cache_dir: str


def setup_from_args(args: argparse.Namespace) -> EvaluationSetup:
    return evaluation_setup(args.model, args.shards, args.pooling, args.batch_size, args.workers, args.cache_dir)


def evaluation_setup(model_ref: str, shards: str | None = None, poolings: list[str] | None = None,
                     batch_size: int = 64, workers: int | None = None,
                     cache_dir: str = DEFAULT_CACHE_DIR) -> EvaluationSetup:
    """The model and where to evaluate it; the defaults are the model's own shards, poolings and loader."""
    if batch_size < 1:
        raise EvaluationError(f"--batch-size {batch_size}: expected an integer >= 1")
    model = load_model(model_ref)
    poolings = check_poolings(model, poolings or default_poolings(model))
    workers = model.cfg.loader_workers if workers is None else workers
    return EvaluationSetup(model, shards or model.cfg.shards, poolings, batch_size, workers, cache_dir)


@contextmanager
def evaluation_run(model: LCRModel, step: str, model_ref: str, run_id: str | None = None,
                   experiment: str | None = None) -> Iterator[tracking.MetricLogger]:
    """A MetricLogger on `run_id`, or on a new run `<run_name>-<step>` ended when the block ends."""
    uri = tracking.tracking_uri()
    own_run = run_id is None
    if own_run:
        cfg = replace(model.cfg, run_name=f"{model.cfg.run_name}-{step}",
                      mlflow_experiment=experiment or model.cfg.mlflow_experiment)
        run_id = tracking.start_run(uri, cfg, {"lcr.step": step, "lcr.model": model_ref})
    logger = tracking.MetricLogger(uri, run_id)
    succeeded = False
    try:
        yield logger
        logger.flush()
        succeeded = True
    finally:
        if own_run:
            tracking.end_run(uri, run_id, succeeded)
