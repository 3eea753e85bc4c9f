"""The MLflow pyfunc embedding model, defined from code (MLflow "models from code"):
no pickled class. Logged by gcl.registry.log_embedding_model.

Input: a DataFrame whose columns are field names (e.g. `query`, or `title` and/or `image`).
Images are bytes, base64 strings or paths. A row with left-side fields is embedded as a
query; a row with right-side fields as a document, fused with the trained field weights.
Output: (N, D) L2-normalized embeddings.
"""

from __future__ import annotations

import base64
import binascii
import json
import os

import mlflow
import numpy as np
import pandas as pd


def decode_image_value(value):
    """bytes stay bytes; a base64 string becomes bytes; any other string is a path."""
    if value is None or isinstance(value, bytes | bytearray | dict):
        return value
    text = str(value)
    if os.path.exists(text):
        return text
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return text  # a path that does not exist: reading it reports the error


class GCLEmbeddingModel(mlflow.pyfunc.PythonModel):
    """Embeds queries and documents with a gcl-trained open_clip model."""

    def load_context(self, context) -> None:
        from gcl.model import CONFIG_FILE
        from gcl.retrieval import RowEncoder

        model_dir = context.artifacts["model"]
        # On the first GPU where CUDA is available (CUDA_VISIBLE_DEVICES= keeps it on the CPU).
        self.row_encoder = RowEncoder.from_model_dir(model_dir)
        self.fields = self.row_encoder.fields
        with open(os.path.join(model_dir, CONFIG_FILE)) as f:
            self.dim = json.load(f)["model_cfg"]["embed_dim"]

    def _side(self, row: pd.Series) -> str:
        has = {
            side: any(pd.notna(row.get(n)) for n in getattr(self.fields, side)) for side in ("left", "right")
        }
        if has["left"] == has["right"]:
            raise ValueError(
                f"each row needs fields of exactly one side: left {sorted(self.fields.left)} (a query) or "
                f"right {sorted(self.fields.right)} (a document); got columns {list(row.index)}"
            )
        return "left" if has["left"] else "right"

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        frame = pd.DataFrame(model_input).copy()
        known = set(self.fields.modalities())
        unknown = set(frame.columns) - known
        if unknown:
            raise ValueError(f"unknown input columns {sorted(unknown)}; this model takes {sorted(known)}")
        for name, modality in self.fields.modalities().items():
            if name not in frame.columns:
                frame[name] = None
            elif modality == "image":
                frame[name] = frame[name].map(decode_image_value)
        frame = frame.astype(object).where(frame.notna(), None)
        sides = np.array([self._side(row) for _, row in frame.iterrows()])
        out = np.zeros((len(frame), self.dim), dtype=np.float32)  # (0, dim) for no rows
        for side in ("left", "right"):
            rows = np.flatnonzero(sides == side)
            if len(rows):
                out[rows] = self.row_encoder.encode(frame.iloc[rows], side).numpy()
        return out


mlflow.models.set_model(GCLEmbeddingModel())
