"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One file, `checkpoint.pt`, written with `torch.save` and read with `torch.load(weights_only=True)`:
only tensors, numbers, strings, lists, tuples, dicts and None go in, so loading never runs pickled
code. It holds the model (query and key encoders, queue and queue pointer are all in its
state_dict), the optimizer and scheduler, where the run stands (epoch, batch within the epoch,
global step), the RNG states of every rank, and the run's configuration.

Beside it, `checkpoint.sha256` (`sha256sum` format) records the file's digest: a truncated or
damaged checkpoint (an interrupted write, upload or copy) is refused before anything is unpickled,
and a resumed run falls back to an older one. A run's folder holds one `checkpoint_<step>` folder
per checkpoint kept; a step written again after a damaged checkpoint was skipped gets `-2`, `-3`, ...
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.storage import file_sha256
from lcr_core.errors import LCRError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKSUM_FILE = "checkpoint.sha256"
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)(?:-(\d+))?")  # checkpoint_<global step>[-<rewrite>]
CHECKSUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S+)\n?")
MAX_CHECKSUM_BYTES = 4096  # a sidecar is one line; a longer file is not one
FORMAT_VERSION = 1
# What torch.load raises for a foreign, truncated or empty file, or one holding pickled code.
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError)
# Config fields a run cannot change when it resumes: they shape the model, its state or the steps.
RESUME_FIXED_FIELDS = ("variant", "backbone", "embed_dim", "projector", "projector_hidden", "queue_size",
                       "num_projections", "gfb_bn_relu", "gfb_mlp_hidden", "bn_splits", "image_size",
                       "batch_size")


@dataclass(frozen=True)
class Progress:
    """Where a run stands: `step_in_epoch` batches of `epoch` are done (0 = the epoch starts afresh)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def rng_state() -> dict[str, Any]:
    """The torch, numpy and python RNG states of this process, in weights_only-safe types."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(_as_python_random_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_random_state(state: Any) -> tuple:
    """`random.setstate` wants tuples; a checkpoint may give lists back."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
                   rng_states: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's content; `rng_states[r]` is rank r's RNG state, `config` an LCRConfig dict."""
    return {
        "format_version": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": rng_states,
        "config": config,
    }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `checkpoint.pt` and then `checkpoint.sha256`, each to a temporary name that is renamed
    once complete: a crash leaves the previous pair, or a pair whose checksum fails, never a
    half-written file that looks whole."""
    path = Path(directory) / CHECKPOINT_FILE
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        digest = file_sha256(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    sidecar = path.with_name(CHECKSUM_FILE)
    partial_sidecar = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.partial")
    partial_sidecar.write_text(f"{digest}  {CHECKPOINT_FILE}\n")
    os.replace(partial_sidecar, sidecar)
    return path


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file itself, given it or the checkpoint folder that holds it."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def load_checkpoint(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file (or folder) on CPU with `weights_only=True`, once its checksum matches.
    `name` is what errors call the file (its URI, when `path` is a downloaded copy)."""
    file = checkpoint_file(path)
    name = name or str(file)
    if not file.is_file():
        raise LCRError(f"checkpoint {name}: no such file (an empty or incomplete checkpoint folder?)")
    verify_checksum(file, name)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except UNREADABLE as err:
        reason = type(err).__name__
        raise LCRError(f"checkpoint {name}: cannot be read as a weights-only torch file ({reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise LCRError(f"checkpoint {name}: not an lcr checkpoint of format version {FORMAT_VERSION}")
    return state


def verify_checksum(file: Path, name: str) -> None:
    """A one-line LCRError unless `file` has the sha256 that the `checkpoint.sha256` beside it records
    for a file of its name: a truncated or damaged file, or any other file (a stray JSON, say), is
    refused before torch unpickles a byte of it."""
    sidecar = file.with_name(CHECKSUM_FILE)
    if not sidecar.is_file():
        raise LCRError(f"checkpoint {name}: no {CHECKSUM_FILE} beside it (an interrupted write or copy?); "
                       f"expected {CHECKPOINT_FILE} and {CHECKSUM_FILE} as `lcr pretrain` writes them")
    with open(sidecar, "rb") as stream:
        text = stream.read(MAX_CHECKSUM_BYTES).decode("ascii", errors="replace")
    line = CHECKSUM_LINE.fullmatch(text)
    if line is None or line[2] != file.name:
        raise LCRError(f"checkpoint {name}: {CHECKSUM_FILE} beside it holds no sha256 of {file.name}; "
                       f"expected one line '<sha256>  {file.name}'")
    if file_sha256(file) != line[1]:
        raise LCRError(f"checkpoint {name}: truncated or corrupt ({file.stat().st_size} bytes whose sha256 "
                       f"differs from the one in {CHECKSUM_FILE})")


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(global step, rewrite) of a checkpoint folder's name; None for any other name."""
    match = CHECKPOINT_DIR.fullmatch(name)
    return (int(match[1]), int(match[2] or 1)) if match else None


def checkpoint_dirs(names: Iterable[str]) -> list[str]:
    """The checkpoint folder names among `names` (a run folder's entries), newest first."""
    return sorted((name for name in names if checkpoint_order(name)), key=checkpoint_order, reverse=True)


def checkpoint_dir_name(global_step: int, taken: Iterable[str]) -> str:
    """`checkpoint_<global_step>`, or with `-2`, `-3`, ... when a folder of that name exists: a damaged
    checkpoint that resume skipped. Ray still lists it and deletes its folder when it prunes that
    entry, so a new checkpoint must not be written into it."""
    base = name = f"checkpoint_{global_step:08d}"
    taken, rewrite = set(taken), 1
    while name in taken:
        rewrite += 1
        name = f"{base}-{rewrite}"
    return name


def newest_readable(names: Iterable[str], load: Callable[[str], dict[str, Any]],
                    warn: Callable[[str], None]) -> tuple[str, dict[str, Any]] | None:
    """(name, state) of the newest checkpoint folder among `names` that `load` reads back whole, or
    None; each newer one that fails (an LCRError: truncated, corrupt, incomplete) is passed to `warn`."""
    for name in checkpoint_dirs(names):
        try:
            return name, load(name)
        except LCRError as err:
            warn(f"{err}; skipped it for an older checkpoint")
    return None


def check_resumable(saved_config: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """A one-line LCRError if `config` changes a field the checkpoint at `where` depends on."""
    for name in RESUME_FIXED_FIELDS:
        saved, wanted = saved_config.get(name), config.get(name)
        if saved != wanted:
            raise LCRError(f"checkpoint {where} was written with {name}={saved!r} but the config has "
                           f"{wanted!r}; expected the same value to resume (or a new run_name)")


def restore_training_state(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler, rank: int, world_size: int) -> Progress:
    """Load model, optimizer and scheduler; restore this rank's RNG state when the world size is the
    one the checkpoint was written with (otherwise the run goes on from the seeded RNG)."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    return Progress(**state["progress"])
