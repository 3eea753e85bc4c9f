"""The MLflow pyfunc search model, defined from code (as gcl.registry.embedding_model's embedding model): the
embedding model and a `gcl index` index in one servable model. Logged by
gcl.search.register.log_search_model.

Input: a DataFrame of queries whose columns are the model's left-side fields (e.g. `query`;
images as bytes, base64 strings or paths). Params: `k` (default 10), the results per query.
Output: one row per query: `ids` (the top k document ids, best first), `scores` (their inner
products with the query, the cosine of normalized embeddings) and, for an index built with
display fields, a list per field (e.g. `title`).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from gcl.registry.serving_input import field_frame


class GCLSearchModel(mlflow.pyfunc.PythonModel):
    """Top-k document search with a gcl-trained open_clip model and its catalog's index."""

    def load_context(self, context) -> None:
        from gcl.retrieval import RowEncoder
        from gcl.search.faiss_index import SearchIndex

        self.row_encoder = RowEncoder.from_model_dir(context.artifacts["model"])
        self.fields = self.row_encoder.fields
        self.index = SearchIndex(context.artifacts["index"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        if k < 1:
            raise ValueError(f"params k={k}: accepted: a positive number of results per query")
        left = {name: spec.modality for name, spec in self.fields.left.items()}
        frame = field_frame(model_input, left)
        empty = [i for i, (_, row) in enumerate(frame.iterrows()) if all(v is None for v in row)]
        if empty:
            raise ValueError(f"query row(s) {empty[:10]} have no value in any query field {sorted(left)}")
        queries = self.row_encoder.encode(frame, "left").numpy() if len(frame) else np.zeros((0, self.index.dim))
        scores, positions = self.index.search(queries, k)
        out = {
            "ids": [[str(self.index.ids[p]) for p in row if p >= 0] for row in positions],
            "scores": [
                [float(s) for s, p in zip(sc, row, strict=True) if p >= 0]
                for sc, row in zip(scores, positions, strict=True)
            ],
        }
        for name, column in self.index.display.items():
            out[name] = [[column[p] for p in row if p >= 0] for row in positions]
        return pd.DataFrame(out)


mlflow.models.set_model(GCLSearchModel())
