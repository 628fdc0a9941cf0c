"""The trained encoder as an MLflow pyfunc model ("models from code": MLflow runs this file to load it).

Artefacts: `weights` (the query encoder's state_dict, a weights-only torch file) and `config` (the
run's LCRConfig as YAML). `predict` maps an N x 3 x H x W float32 array of normalised images to
N x D L2-normalised embeddings (the variant's test-time pooling). This file imports only numpy,
torch, yaml, mlflow and `lcr_core` (which travels with the model as code).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml

from lcr_core.config import LCRConfig, config_from_dict
from lcr_core.errors import LCRError
from lcr_core.model import LCRModel, build_model

ENCODER_PREFIX = "encoder_q."  # the query encoder: what inference uses
EMBED_CHUNK = 64  # images per forward pass in `predict`


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The query encoder's weights: all an embedding needs (no key encoder, no queue)."""
    return {k: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}


def trained_model(cfg: LCRConfig) -> LCRModel:
    """An untrained LCRModel to load trained weights into: the initial backbone weights the run
    started from are not needed (nor, perhaps, reachable) where the model is loaded."""
    return build_model(replace(cfg, backbone_weights=None))


def model_from_encoder_state(cfg: LCRConfig, state: dict[str, torch.Tensor]) -> LCRModel:
    """An LCRModel in eval mode whose query (and key) encoder carry `state`."""
    model = trained_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(ENCODER_PREFIX)]
    if missing or unexpected:
        raise LCRError(f"encoder weights do not fit the {cfg.backbone}/{cfg.variant} model ({len(missing)} "
                       f"missing e.g. {missing[:1]}, {len(unexpected)} unexpected e.g. {unexpected[:1]})")
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    return model.eval()


class EncoderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: normalised images (N x 3 x H x W float32) -> L2-normalised embeddings (N x D)."""

    def load_context(self, context) -> None:
        cfg = config_from_dict(yaml.safe_load(Path(context.artifacts["config"]).read_text()), "model config")
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model_from_encoder_state(cfg, state).to(self.device)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            chunks = [self.model.embed(chunk.to(self.device)).cpu() for chunk in images.split(EMBED_CHUNK)]
        return torch.cat(chunks).numpy()


mlflow.models.set_model(EncoderModel())
