"""`gcl ui`: a search page over one to three models, side by side (gcl.search.page serves it).

Each model is a registered search model (`models:/NAME@ALIAS`, from `gcl index --register`), a
`gcl index` directory (searched with the model its embeddings came from), or an embedding model
(any reference `gcl evaluate` takes) whose catalog (`--catalog`, else the split's documents) is
embedded at start and searched exactly. With `--eval-split`, every result shows its grade and every
column its NDCG@10 for the query, and the split's queries are listed where the models differ most.
"""

from __future__ import annotations

import json
import os
import tempfile

import pandas as pd

from gcl.console import say
from gcl.errors import ConfigError, DataError
from gcl.job_config import JobConfig
from gcl.model_refs import resolve_model_dir
from gcl.retrieval import RowEncoder
from gcl.search.faiss_index import INFO_FILE, SearchIndex
from gcl.search.page import (
    Column,
    SearchPage,
    Thumbnails,
    catalog_images,
    create_app,
    display_titles,
    load_judgments,
)
from gcl.tracking.runs import check_tracking
from gcl.train.job import resolve_job

MODELS_ACCEPTED = (
    "a search model registered by `gcl index --register NAME` (models:/NAME@ALIAS), a `gcl index` "
    "directory, or an embedding model (a model directory, runs:/ or models:/ URI) with a catalog"
)


def _catalog_index(job: JobConfig, encoder: RowEncoder, files: list[str], spec: str) -> SearchIndex:
    """An exact index, in memory, of the catalog's documents embedded by `encoder` (each id once)."""
    from gcl.data.readers import image_base_dir, read_table

    id_column, fields = job.data.document_id_column, list(encoder.fields.right)
    frames = []
    for file in files:
        frame = read_table(file).to_pandas()
        missing = [c for c in (id_column, *fields) if c not in frame.columns]
        if missing:
            raise DataError(
                f"{file}: no column(s) {missing} for the documents of {spec} (columns: {list(frame.columns)})"
            )
        frames.append(frame)
    docs = pd.concat(frames).drop_duplicates(id_column).reset_index(drop=True)
    encoder.base_dir = image_base_dir(files[0], job.data.image_root)
    vectors = encoder.encode(docs[fields], "right").numpy()
    text = next((n for n, s in encoder.fields.right.items() if s.modality == "text"), None)
    display = {text: docs[text].to_numpy()} if text else {}
    return SearchIndex.in_memory(docs[id_column].astype(str).to_numpy(), vectors, id_column, display)


def load_column(job: JobConfig, spec: str, scratch: str, catalog_files: list[str]) -> Column:
    """The page's column for `spec`: its query encoder and index, checked (ModelError, SearchIndexError)."""
    uri = job.mlflow.resolved_uri()
    if os.path.isfile(os.path.join(spec, INFO_FILE)):  # a gcl index directory: its own model embeds the queries
        SearchIndex.check_directory(spec)
        with open(os.path.join(spec, INFO_FILE)) as f:
            model = json.load(f).get("model_uri")
        model_dir = resolve_model_dir(model, scratch, uri, fallback_job=job)
        return Column(spec, RowEncoder.from_model_dir(model_dir, fields=job.fields), SearchIndex(spec))
    model_dir = resolve_model_dir(spec, scratch, uri, fallback_job=job)  # ModelError: not a model either
    index_dir = os.path.join(os.path.dirname(model_dir), "index")  # a search model's other artifact
    if spec.startswith(("models:/", "runs:/")) and os.path.isfile(os.path.join(index_dir, INFO_FILE)):
        return Column(spec, RowEncoder.from_model_dir(model_dir, fields=job.fields), SearchIndex(index_dir))
    if not catalog_files:
        raise ConfigError(f"--model {spec}: an embedding model searches a catalog: give --catalog or --eval-split")
    encoder = RowEncoder.from_model_dir(model_dir, fields=job.fields)
    return Column(spec, encoder, _catalog_index(job, encoder, catalog_files, spec))


def build_page(
    job: JobConfig, models: list[str], eval_split: str | None, catalog: str | None, scratch: str
) -> SearchPage:
    """Every model, the split's judgments and the catalog's images loaded and checked, once."""
    from gcl.data.readers import image_base_dir, resolve_files

    if not 1 <= len(models) <= 3:
        raise ConfigError(f"--model given {len(models)} times: the page shows 1 to 3 models side by side")
    if any(spec.startswith(("models:/", "runs:/")) for spec in models):
        check_tracking(job.mlflow.resolved_uri())
    split_files = resolve_files(eval_split) if eval_split else []
    catalog_files = resolve_files(catalog) if catalog else split_files
    columns = [load_column(job, spec, tempfile.mkdtemp(dir=scratch), catalog_files) for spec in models]
    fields = columns[0].row_encoder.fields
    judgments = None
    if split_files:
        judgments = load_judgments(split_files, job.data, fields, job.eval.grade_column, job.eval.relevance_level)
    image_field = next((n for n, s in fields.right.items() if s.modality == "image"), None)
    title_field = next((n for n, s in fields.right.items() if s.modality == "text"), None)
    id_column = columns[0].index.info["id_column"]
    images, titles = catalog_images(catalog_files, id_column, image_field, title_field) if catalog_files else ({}, {})
    for column in columns:  # titles the indexes kept (gcl index --display title), where the catalog has none
        for doc, title in display_titles(column.index, title_field or "title").items():
            titles.setdefault(doc, title)
    base_dir = image_base_dir(catalog_files[0], job.data.image_root) if catalog_files else None
    return SearchPage(columns, titles, Thumbnails(images, base_dir), judgments)


def run_ui(
    job: JobConfig,
    models: list[str],
    eval_split: str | None = None,
    catalog: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
) -> None:
    """Load the page (a bad model, split or catalog fails here, before the server starts) and serve it."""
    import uvicorn

    job = resolve_job(job)
    listening = listen(host, port)  # first: a port in use fails before any model loads
    with listening, tempfile.TemporaryDirectory(prefix="gcl-ui-") as scratch:
        page = build_page(job, models, eval_split, catalog, scratch)
        if host not in ("127.0.0.1", "localhost", "::1"):
            say(
                f"warning: --host {host} serves the page, and every model's search, to anyone who can reach "
                "this machine: there is no authentication"
            )
        port = listening.getsockname()[1]  # --port 0: the port the system chose
        say(f"gcl ui: http://{host}:{port}/ ({', '.join(models)}); Ctrl-C stops it")
        server = uvicorn.Server(uvicorn.Config(create_app(page), host=host, port=port, log_level="warning"))
        server.run(sockets=[listening])


def listen(host: str, port: int):
    """A socket bound to (host, port) and listening; a ConfigError naming the port when it cannot be."""
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: not a TCP port; give one from 1 to 65535 (0: any free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); the port may "
            "be in use: give another --port"
        ) from None
    return sock
