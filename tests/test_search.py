"""From the registry to search: `gcl embed` (Ray Data batch inference), `gcl index` (FAISS), the
registered search model served by `mlflow models serve` over HTTP, and `gcl evaluate --index`.
A real local Ray cluster, a real SQLite MLflow store and a real model server; the model is the
tiny open_clip config, untrained (its embeddings are as good as any for these checks)."""

import glob
import json
import urllib.request

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import register_tiny_model, served_model, write_embeddings

from gcl.errors import DataError, SearchIndexError
from gcl.job_config import EmbedConfig, IndexConfig
from gcl.search.batch_embed import EMBEDDING_COLUMN, METADATA_KEY
from gcl.search.faiss_index import SearchIndex, build_index, corpus_vectors


def clustered_unit_vectors(rows: int, dim: int, seed: int, centres: int | None = None) -> np.ndarray:
    """Unit vectors around `centres` random directions (about 100 each), as embeddings of a catalog
    cluster by kind of product; uniformly random vectors have no near neighbours to find."""
    from gcl.bench.search import clustered_unit_vectors as generate

    return generate(rows, dim, seed, centres)


def test_every_index_kind_finds_the_exact_neighbours_at_its_defaults(tmp_path):
    """flat is exact; hnsw and ivf-pq hold recall@10 >= 0.95 against it at their default settings;
    the id map, display columns and build facts are saved with the index."""
    vectors = clustered_unit_vectors(20_000, 64, seed=0)
    queries = clustered_unit_vectors(300, 64, seed=1, centres=200)
    ids = np.array([f"p{i}" for i in range(len(vectors))], dtype=object)
    source = write_embeddings(tmp_path / "emb", vectors, ids, {"title": [f"t{i}" for i in range(len(vectors))]})
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    for kind in ("flat", "hnsw", "ivf-pq"):
        out = tmp_path / kind
        built = build_index(IndexConfig(kind=kind, embeddings=source, out=str(out), display=["title"]))
        assert built["rows"] == 20_000 and built["dim"] == 64 and built["model_uri"] == "models:/m/1"
        index = SearchIndex(str(out))
        scores, found = index.search(queries, 10)
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
        assert recall == 1.0 if kind == "flat" else recall >= 0.95, (kind, recall)
        assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
        assert index.ids[found[0, 0]] == f"p{found[0, 0]}" and index.display["title"][found[0, 0]] == f"t{found[0, 0]}"
        np.testing.assert_allclose(corpus_vectors(index), vectors, atol=1e-6)


def test_an_id_read_twice_is_indexed_once_and_bad_parameters_are_named(tmp_path):
    vectors = clustered_unit_vectors(600, 32, seed=2, centres=6)
    ids = np.array([f"p{i % 500}" for i in range(600)], dtype=object)  # the last 100 rows repeat ids
    source = write_embeddings(tmp_path / "emb", vectors, ids)
    built = build_index(IndexConfig(kind="flat", embeddings=source, out=str(tmp_path / "flat")))
    assert built["rows"] == 500 and built["repeated_rows"] == 100
    assert list(SearchIndex(str(tmp_path / "flat")).ids) == [f"p{i}" for i in range(500)]
    with pytest.raises(SearchIndexError, match=r"index.pq_bytes=5 does not divide the embedding dimension 32"):
        build_index(IndexConfig(kind="ivf-pq", pq_bytes=5, embeddings=source, out=str(tmp_path / "pq")))
    with pytest.raises(SearchIndexError, match=r"no column\(s\) \['title'\] to display; `gcl embed --keep"):
        build_index(IndexConfig(embeddings=source, out=str(tmp_path / "x"), display=["title"]))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(SearchIndexError, match="no gcl metadata: not written by `gcl embed`"):
        build_index(IndexConfig(embeddings=str(tmp_path / "plain.parquet"), out=str(tmp_path / "y")))
    with pytest.raises(SearchIndexError, match="no index.faiss; give a directory written by `gcl index`"):
        SearchIndex(str(tmp_path))


def test_a_failed_index_write_leaves_the_previous_index_whole_and_unfinished_embeddings_are_refused(tmp_path):
    """A write that fails part-way (here the file-size limit, RLIMIT_FSIZE, standing in for a full
    disk: mounting a small filesystem needs privileges this machine's tests do not have) is named,
    and leaves the index that was there whole, with no partial directory beside it. Embeddings
    that gcl embed did not finish writing (no summary: it is written last) or that lost a file
    since are refused, naming the directory."""
    import os
    import resource
    import signal

    small = write_embeddings(
        tmp_path / "small",
        clustered_unit_vectors(50, 64, seed=3, centres=5),
        np.array([f"p{i}" for i in range(50)], dtype=object),
    )
    large = write_embeddings(
        tmp_path / "large",
        clustered_unit_vectors(4000, 64, seed=4),
        np.array([f"p{i}" for i in range(4000)], dtype=object),
    )
    out = tmp_path / "index"
    build_index(IndexConfig(kind="flat", embeddings=small, out=str(out)))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, limits[1]))  # the flat index of 4000 vectors is 1 MiB
    try:
        with pytest.raises(
            SearchIndexError, match=rf"{out}: the index could not be written .*nothing was written there"
        ):
            build_index(IndexConfig(kind="flat", embeddings=large, out=str(out)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert SearchIndex(str(out)).index.ntotal == 50  # the index that was there, whole
    assert sorted(os.listdir(tmp_path)) == ["index", "large", "small"]  # no partial directory left

    (tmp_path / "large" / "_gcl_embeddings.json").unlink()
    with pytest.raises(SearchIndexError, match=r"large: no readable _gcl_embeddings.json: `gcl embed` did not finish"):
        build_index(IndexConfig(embeddings=large, out=str(tmp_path / "x")))
    (tmp_path / "small" / "part-1.parquet").unlink()
    with pytest.raises(SearchIndexError, match=r"small: its files hold 25 rows where _gcl_embeddings.json counts 50"):
        build_index(IndexConfig(embeddings=small, out=str(tmp_path / "x")))


# ---------------------------------------------------------------------------------------------
# A registered model, its catalog embedded on Ray, indexed, registered and served


@pytest.fixture(scope="module")
def registered(tmp_path_factory, synth_dir):
    """The tiny model logged as gcl's pyfunc and registered as tiny@champion in a SQLite store."""
    root = tmp_path_factory.mktemp("search")
    return root, register_tiny_model(root)


def _job(root, uri, *overrides):
    from gcl.config import parse_config
    from gcl.job_config import JobConfig

    return parse_config(JobConfig, None, [f"storage={root}/runs", f"mlflow.tracking_uri={uri}", *overrides])


@pytest.fixture(scope="module")
def embedded(ray_local, registered, synth_dir):
    """`gcl embed` of the whole synthetic catalog (every split's pairs: documents repeat)."""
    from workflows.embed import run_embed

    root, uri = registered
    job = _job(
        root,
        uri,
        "embed.model=models:/tiny@champion",
        f"embed.input={synth_dir}/*.parquet",
        f"embed.out={root}/catalog",
        "embed.keep=[title]",
        "embed.batch_size=64",
    )
    return run_embed(job), root, uri


@pytest.mark.integration
def test_gcl_embed_writes_what_the_served_model_returns_for_the_same_rows(embedded, synth_dir):
    """Every input row is embedded once, equal (1e-6) to the registered pyfunc's predict on the same
    rows; the files name the model version the alias pointed at."""
    import mlflow

    from gcl.tracking.runs import fluent_tracking_uri

    summary, root, uri = embedded
    files = sorted(glob.glob(f"{root}/catalog/*.parquet"))
    out = pq.read_table(files).to_pandas()
    pairs = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(f"{synth_dir}/*.parquet"))])
    assert summary["rows"] == len(out) == len(pairs) and summary["model_uri"] == "models:/tiny/1"
    assert sorted(out["product_id"]) == sorted(pairs["product_id"])
    meta = json.loads(pq.read_schema(files[0]).metadata[METADATA_KEY])
    assert meta["model_uri"] == "models:/tiny/1" and meta["model_version"] == "1" and meta["dim"] == 64
    assert pq.read_schema(files[0]).field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 64)
    sample = pairs.drop_duplicates("product_id").head(20)
    with fluent_tracking_uri(uri):
        served = mlflow.pyfunc.load_model("models:/tiny@champion")
    want = served.predict(pd.DataFrame({"title": sample["title"], "image": [v["bytes"] for v in sample["image"]]}))
    got = np.stack(
        out.drop_duplicates("product_id").set_index("product_id").loc[sample["product_id"], EMBEDDING_COLUMN]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert list(out.drop_duplicates("product_id").set_index("product_id").loc[sample["product_id"], "title"]) == list(
        sample["title"]
    )


@pytest.mark.integration
def test_gcl_embed_names_bad_rows_before_loading_the_model_or_skips_and_counts_them(
    ray_local, registered, synth_dir, tmp_path
):
    """An undecodable image and a row with no field: a DataError naming file, row and column, as
    `gcl data validate` words it; with data.on_bad_rows=skip the others are embedded and the two
    are counted."""
    from gcl.search.batch_embed import embed_rows

    root, uri = registered
    rows = pd.read_parquet(f"{synth_dir}/train.parquet").drop_duplicates("product_id").head(12).reset_index(drop=True)
    rows.at[3, "image"] = {"bytes": b"not an image", "path": None}
    rows.at[7, "image"], rows.at[7, "title"] = None, None
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), catalog)
    cfg = EmbedConfig(model="models:/tiny@champion", input=str(catalog), out=str(tmp_path / "out"))
    with pytest.raises(DataError) as err:
        embed_rows(_job(root, uri), cfg, uri)
    message = str(err.value)
    assert f"{catalog} row 3 column 'image': image cannot be decoded" in message
    assert f"{catalog} row 7 column 'image/title': the right side has no value in any field" in message
    assert "12 rows, 2 bad" in message and not (tmp_path / "out").exists()
    summary = embed_rows(_job(root, uri, "data.on_bad_rows=skip"), cfg, uri)
    written = pq.read_table(str(tmp_path / "out")).to_pandas()
    assert summary["rows"] == 10 and summary["bad_rows"] == 2 and len(written) == 10
    assert set(written["product_id"]) == set(rows["product_id"].drop([3, 7]))


@pytest.mark.integration
def test_gcl_embed_writes_a_lance_dataset(ray_local, registered, synth_dir, tmp_path):
    lance = pytest.importorskip("lance")
    from gcl.search.batch_embed import embed_rows

    root, uri = registered
    cfg = EmbedConfig(
        model="models:/tiny@champion", input=f"{synth_dir}/zero_shot.parquet", out=str(tmp_path / "catalog.lance")
    )
    summary = embed_rows(_job(root, uri), cfg, uri)
    table = lance.dataset(str(tmp_path / "catalog.lance")).to_table()
    assert table.num_rows == summary["rows"] == pq.read_metadata(f"{synth_dir}/zero_shot.parquet").num_rows
    assert table.schema.field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 64)


@pytest.mark.integration
def test_gcl_evaluate_with_an_index_prints_its_ndcg_beside_exact_search(embedded, synth_dir, tmp_path):
    """A flat index ranks as exact search does (the same NDCG, neighbours recall 1)."""
    from workflows.evaluate import run_evaluate_index

    _, root, uri = embedded
    build_index(IndexConfig(kind="flat", embeddings=f"{root}/catalog", out=str(tmp_path / "flat")))
    job = _job(
        root, uri, f"data.eval={{in_domain: {synth_dir}/in_domain.parquet, zero_shot: {synth_dir}/zero_shot.parquet}}"
    )
    results = run_evaluate_index(job, str(tmp_path / "flat"))
    exact, flat = results["exact search"], results["flat index"]
    assert set(exact) == {"in_domain", "zero_shot"}
    for split in exact:
        assert flat[split]["ndcg@10"] == pytest.approx(exact[split]["ndcg@10"], abs=1e-6)
        assert flat[split]["neighbours_recall@10"] == 1.0 and 0 < exact[split]["ndcg@10"] <= 1


def _post(port: int, payload: dict) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


@pytest.mark.integration
def test_the_registered_search_model_serves_the_exact_top_k_over_http(embedded, synth_dir, tmp_path):
    """gcl index --register: `mlflow models serve` of the search model answers a real HTTP request
    with the ids exact search over gcl embed's output finds (for queries whose top 5 are apart by
    more than rounding), with their titles; k comes from params."""
    import mlflow
    from mlflow import MlflowClient

    from gcl.tracking.runs import fluent_tracking_uri
    from workflows.index import run_index

    _, root, uri = embedded
    job = _job(root, uri, f"index.embeddings={root}/catalog", f"index.out={tmp_path}/index", "index.display=[title]")
    built = run_index(job, register="tiny-search")
    assert built["alias"] == "champion"
    version = MlflowClient(uri).get_model_version_by_alias("tiny-search", "champion")
    assert (
        version.tags["embedding_model"] == "models:/tiny/1" and version.tags["corpus_sha256"] == built["corpus_sha256"]
    )
    assert json.loads(version.tags["index"])["kind"] == "hnsw"

    catalog = pq.read_table(f"{root}/catalog").to_pandas().drop_duplicates("product_id")
    vectors = np.stack(catalog[EMBEDDING_COLUMN])
    queries = pd.read_parquet(f"{synth_dir}/in_domain.parquet")["query"].drop_duplicates().tolist()
    with fluent_tracking_uri(uri):
        embedder = mlflow.pyfunc.load_model("models:/tiny@champion")
    q = embedder.predict(pd.DataFrame({"query": queries}))
    scores = q @ vectors.T
    top = np.argsort(-scores, axis=1)[:, :6]
    gaps = np.diff(np.take_along_axis(scores, top, axis=1), axis=1)
    clear = [i for i in range(len(queries)) if np.all(gaps[i] < -1e-4)][:3]
    assert clear, "no query with an unambiguous top 5"

    with served_model("models:/tiny-search@champion", uri, tmp_path) as port:
        answers = _post(port, {"dataframe_records": [{"query": queries[i]} for i in clear], "params": {"k": 5}})
        default_k = _post(port, {"dataframe_records": [{"query": queries[clear[0]]}]})
    ids = catalog["product_id"].to_numpy()
    for i, answer in zip(clear, answers, strict=True):
        assert answer["ids"] == [str(ids[j]) for j in top[i, :5]]
        np.testing.assert_allclose(answer["scores"], scores[i, top[i, :5]], atol=1e-5)
        assert answer["title"] == [catalog["title"].iloc[j] for j in top[i, :5]]
    assert len(default_k[0]["ids"]) == 10


@pytest.mark.integration
@pytest.mark.slow
def test_gcl_bench_search_measures_embedding_and_indexes_side_by_side(ray_local, tmp_path):
    """The search section's code on small inputs (the figures themselves come from `gcl bench
    --only search` at 1M vectors): its keys, a recall an index at its defaults must reach, and
    the uniformly random case it reports beside it."""
    from gcl.bench.search import embed_figures, index_figures
    from workflows.bench import bench_job

    figures = index_figures(5000, 32, n_queries=200, workdir=str(tmp_path))
    for kind in ("hnsw", "ivfpq"):
        assert figures[f"search_clustered_5k_d32_{kind}_recall_at_10"] >= 0.95
        assert figures[f"search_clustered_5k_d32_{kind}_over_flat"] > 0
        assert figures[f"search_clustered_5k_d32_{kind}_bytes"] > 0
    uniform = index_figures(5000, 32, n_queries=200, kinds=("hnsw",), vectors="uniform", workdir=str(tmp_path))
    assert 0 <= uniform["search_uniform_5k_d32_hnsw_recall_at_10"] <= 1
    embed = embed_figures(bench_job(str(tmp_path), 0), rows=300, workdir=str(tmp_path))
    assert embed["embed_bare_loop_rows_per_s"] > 0 and embed["embed_rows_per_s"] > 0
