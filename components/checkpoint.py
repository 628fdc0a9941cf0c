"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One file, `checkpoint.pt`, written with `torch.save` and read with `torch.load(weights_only=True)`:
only tensors, numbers, strings, lists, tuples, dicts and None go in, so loading never runs pickled
code. It holds the model (query and key encoders, queue and queue pointer are all in its
state_dict), the optimizer and scheduler, where the run stands (epoch, batch within the epoch,
global step), the RNG states of every rank, and the run's configuration.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcr_core.errors import LCRError

CHECKPOINT_FILE = "checkpoint.pt"
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
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file itself, given it or the checkpoint folder that holds it."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (or folder) on CPU with `weights_only=True`."""
    file = checkpoint_file(path)
    if not file.is_file():
        raise LCRError(f"checkpoint {path}: no {CHECKPOINT_FILE} there")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except UNREADABLE as err:
        reason = type(err).__name__
        raise LCRError(f"checkpoint {file}: cannot be read as a weights-only torch file ({reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise LCRError(f"checkpoint {file}: not an lcr checkpoint of format version {FORMAT_VERSION}")
    return state


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
