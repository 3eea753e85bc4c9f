"""The search page's server (`gcl ui`): one to three models side by side over their indexes, a
thin HTML page over JSON endpoints (Starlette, which MLflow's own serving already brings).

    GET /                      the page (gcl/search/ui_page.html)
    GET /api/models            the columns' labels, and whether an evaluation split is loaded
    GET /api/search?q=&k=      per column the top k: rank, id, score, title, grade; NDCG@10 of the
                               query where the split judges it
    GET /api/queries           the split's queries with each column's NDCG@10, where they differ most first
    GET /thumb?id=             a catalog image as a small JPEG (resized once; a placeholder where it
                               cannot be decoded)

Queries are encoded by the RowEncoder the served search model uses, searched in each column's
index, and judged with gcl.metrics, the code `gcl evaluate` scores with. Models, indexes, the
catalog's images and the split's judgments are loaded once, at start.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

from gcl.metrics import evaluate
from gcl.retrieval import RowEncoder
from gcl.search.faiss_index import SearchIndex

log = logging.getLogger(__name__)
MAX_QUERY_CHARS = 1000
MAX_K = 100
NDCG = "ndcg@10"
THUMB_PIXELS = 160
PAGE = Path(__file__).with_name("ui_page.html")


@dataclass
class Column:
    """One model on the page: its label, the encoder of its queries and its catalog's index."""

    label: str
    row_encoder: RowEncoder
    index: SearchIndex

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float, int]]]:
        """Per query, the top k as (id, score, position in the index)."""
        left = self.row_encoder.fields.left
        text_field = next(name for name, spec in left.items() if spec.modality == "text")
        frame = pd.DataFrame({name: queries if name == text_field else [None] * len(queries) for name in left})
        vectors = self.row_encoder.encode(frame, "left").numpy()
        scores, positions = self.index.search(vectors, k)
        return [
            [(str(self.index.ids[p]), float(s), int(p)) for s, p in zip(sc, pos, strict=True) if p >= 0]
            for sc, pos in zip(scores, positions, strict=True)
        ]


@dataclass
class Judgments:
    """An evaluation split: its queries' text -> query id, and the grades {query id: {doc id: grade}}."""

    query_ids: dict[str, str]
    qrels: dict[str, dict[str, float]]
    relevance_level: float = 1.0
    max_grade: float = field(init=False)

    def __post_init__(self):
        self.max_grade = max((g for docs in self.qrels.values() for g in docs.values()), default=0.0)

    def ndcg(self, rankings: Mapping[str, list[tuple[str, float, int]]]) -> dict[str, float]:
        """NDCG@10 of each query's ranking ({query id: ranked}), as gcl evaluate computes it
        (gcl.metrics, one call for all of them)."""
        run = {qid: {doc: score for doc, score, _ in ranked} for qid, ranked in rankings.items()}
        _, per_query = evaluate(
            {qid: self.qrels[qid] for qid in rankings},
            run,
            [NDCG],
            per_query=True,
            relevance_level=self.relevance_level,
            max_grade=self.max_grade,
        )
        return {qid: values[NDCG] for qid, values in per_query.items()}


class Thumbnails:
    """Catalog images by id, each decoded and resized once (`image_of`: id -> bytes, a path or None)."""

    def __init__(self, image_of: Mapping[str, object], base_dir: str | None = None, cached: int = 4096):
        self.image_of, self.base_dir = image_of, base_dir
        self.jpeg = lru_cache(maxsize=cached)(self._jpeg)

    def _jpeg(self, doc_id: str) -> bytes | None:
        from PIL import Image

        from gcl.data.readers import image_bytes

        value = self.image_of.get(doc_id)
        if value is None:
            return None
        try:
            with Image.open(io.BytesIO(image_bytes(value, self.base_dir))) as image:
                image = image.convert("RGB")
                image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
                out = io.BytesIO()
                image.save(out, "JPEG", quality=85)
                return out.getvalue()
        except Exception as err:  # an image that does not decode gets the placeholder; the page goes on
            log.warning("image of %s cannot be shown: %s", doc_id, err)
            return None


@lru_cache(maxsize=1)
def placeholder() -> bytes:
    """A grey square: the thumbnail of a document whose image is missing or does not decode."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (THUMB_PIXELS, THUMB_PIXELS), (215, 215, 215)).save(out, "PNG")
    return out.getvalue()


class SearchPage:
    """What the endpoints answer from: the columns, titles by id, thumbnails, and the split's
    judgments with every column's NDCG@10 per judged query (computed once, at start)."""

    def __init__(
        self,
        columns: list[Column],
        titles: Mapping[str, str],
        thumbnails: Thumbnails,
        judgments: Judgments | None = None,
    ):
        self.columns, self.titles, self.thumbnails, self.judgments = columns, titles, thumbnails, judgments
        self.query_table: list[dict] = []
        if judgments:
            texts = list(judgments.query_ids)
            qids = [judgments.query_ids[text] for text in texts]
            per_column = [judgments.ndcg(dict(zip(qids, column.search(texts, 10), strict=True))) for column in columns]
            for text, qid in zip(texts, qids, strict=True):
                scores = [ndcg[qid] for ndcg in per_column]
                self.query_table.append({"query": text, NDCG: scores, "spread": max(scores) - min(scores)})
            self.query_table.sort(key=lambda row: (-row["spread"], row["query"]))

    def search(self, query: str, k: int) -> dict:
        qid = self.judgments.query_ids.get(query) if self.judgments else None
        columns = []
        for column in self.columns:
            ranked = column.search([query], max(k, 10) if qid else k)[0]
            grades = self.judgments.qrels[qid] if qid else {}
            columns.append(
                {
                    "label": column.label,
                    NDCG: self.judgments.ndcg({qid: ranked})[qid] if qid else None,
                    "results": [
                        {
                            "rank": rank,
                            "id": doc,
                            "score": score,
                            "title": self.titles.get(doc),
                            "grade": grades.get(doc) if qid else None,
                        }
                        for rank, (doc, score, _) in enumerate(ranked[:k], start=1)
                    ],
                }
            )
        return {"query": query, "judged": qid is not None, "columns": columns}


def check_query(q: str | None, k: str | None) -> tuple[str, int]:
    """The query and k of a request, or ValueError saying what is accepted."""
    query = (q or "").strip()
    if not query or len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"q: give a query of 1 to {MAX_QUERY_CHARS:,} characters (got {len(query):,})")
    try:
        results = int(k) if k not in (None, "") else 10
    except ValueError:
        raise ValueError(f"k={k!r}: give a whole number from 1 to {MAX_K}") from None
    if not 1 <= results <= MAX_K:
        raise ValueError(f"k={results}: give a whole number from 1 to {MAX_K}")
    return query, results


def create_app(page: SearchPage):
    """The Starlette app of `page`: the HTML page and its JSON endpoints; any other path is a 404."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    html = PAGE.read_text()

    async def index(request):
        return HTMLResponse(html)

    async def models(request):
        return JSONResponse(
            {"models": [c.label for c in page.columns], "judged": page.judgments is not None, "max_k": MAX_K}
        )

    async def search(request):
        try:
            query, k = check_query(request.query_params.get("q"), request.query_params.get("k"))
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(await run_in_threadpool(page.search, query, k))  # torch work off the event loop

    async def queries(request):
        return JSONResponse({"models": [c.label for c in page.columns], "queries": page.query_table})

    async def thumb(request):
        doc_id = request.query_params.get("id", "")
        jpeg = await run_in_threadpool(page.thumbnails.jpeg, doc_id)
        if jpeg is None:
            return Response(placeholder(), media_type="image/png")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    routes = [
        Route("/", index),
        Route("/api/models", models),
        Route("/api/search", search),
        Route("/api/queries", queries),
        Route("/thumb", thumb),
    ]
    return Starlette(routes=routes)


def load_judgments(files: list[str], data, fields, grade_column: str, relevance_level: float) -> Judgments:
    """An evaluation split's query texts and grades (gcl.retrieval.load_split's reading)."""
    from gcl.retrieval import load_split

    queries, _, qrels = load_split(files, data, fields, grade_column)
    text_field = next(name for name, spec in fields.left.items() if spec.modality == "text")
    query_ids = {
        str(text): str(qid)
        for qid, text in zip(queries[data.query_id_column], queries[text_field], strict=True)
        if isinstance(text, str)
    }
    return Judgments(query_ids, qrels, relevance_level)


def catalog_images(
    files: list[str], id_column: str, image_column: str | None, title_column: str | None
) -> tuple[dict, dict]:
    """({id: image value}, {id: title}) of a catalog's files (each id's first row), read a file at a time."""
    from gcl.data.readers import field_text, read_table
    from gcl.errors import DataError

    images: dict[str, object] = {}
    titles: dict[str, str] = {}
    for file in files:
        frame = read_table(file).to_pandas()
        if id_column not in frame.columns:
            raise DataError(
                f"{file}: no column {id_column!r}, the index's id column (columns: {list(frame.columns)}); "
                "give the catalog the index was built from"
            )
        rows = len(frame)
        ids = frame[id_column].astype(str).tolist()
        image_values = frame[image_column].tolist() if image_column in frame.columns else [None] * rows
        title_values = frame[title_column].tolist() if title_column in frame.columns else [None] * rows
        for doc, image, title in zip(ids, image_values, title_values, strict=True):
            if doc in images:
                continue
            images[doc] = image
            if field_text(title) is not None:
                titles[doc] = field_text(title)
    return images, titles


def display_titles(index: SearchIndex, column: str = "title") -> dict[str, str]:
    """Titles the index kept in its id map (gcl index --display title), by id."""
    if column not in index.display:
        return {}
    from gcl.data.readers import field_text

    return {str(i): field_text(t) for i, t in zip(index.ids, index.display[column], strict=True) if field_text(t)}
