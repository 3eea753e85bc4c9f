"""The MLflow pyfunc embedding model, defined from code (MLflow "models from code"):
no pickled class. Logged by gcl.registry.models.log_embedding_model.

Input: a DataFrame whose columns are field names (e.g. `query`, or `title` and/or `image`).
Images are bytes, base64 strings or paths. A row with left-side fields is embedded as a
query; a row with right-side fields as a document, fused with the trained field weights.
Output: (N, D) L2-normalized embeddings.
"""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pandas as pd

from gcl.registry.serving_input import field_frame


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
        has = {side: any(pd.notna(row.get(n)) for n in getattr(self.fields, side)) for side in ("left", "right")}
        if has["left"] == has["right"]:
            raise ValueError(
                f"each row needs fields of exactly one side: left {sorted(self.fields.left)} (a query) or "
                f"right {sorted(self.fields.right)} (a document); got columns {list(row.index)}"
            )
        return "left" if has["left"] else "right"

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        frame = field_frame(model_input, self.fields.modalities())
        sides = np.array([self._side(row) for _, row in frame.iterrows()])
        out = np.zeros((len(frame), self.dim), dtype=np.float32)  # (0, dim) for no rows
        for side in ("left", "right"):
            rows = np.flatnonzero(sides == side)
            if len(rows):
                out[rows] = self.row_encoder.encode(frame.iloc[rows], side).numpy()
        return out


mlflow.models.set_model(GCLEmbeddingModel())
