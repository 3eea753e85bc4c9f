"""`gcl ui`: the search page's server, run as a user runs it (the `gcl` console script, a real HTTP
server on loopback), over two `gcl index` directories of two different tiny models, with an
evaluation split's grades; and the page itself in headless Chromium (slow tier)."""

import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import free_port, register_tiny_model, wait_until_answers, write_embeddings
from PIL import Image

GCL = os.path.join(os.path.dirname(sys.executable), "gcl")
MARKUP_TITLE = "<script>window.pwned = 1</script><b>bold</b> shoe"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, synth_dir):
    """Two models (the registered tiny@champion and another tiny model, seed 1), each with a flat
    index of the in_domain split's documents; a catalog of those documents in which one title holds
    markup and one image is bytes that do not decode."""
    from gcl.config import FieldsConfig
    from gcl.job_config import IndexConfig
    from gcl.model import ModelConfig, create_model, save_model
    from gcl.retrieval import RowEncoder
    from gcl.search.faiss_index import build_index

    root = tmp_path_factory.mktemp("ui")
    uri = register_tiny_model(root)  # root/model, registered as models:/tiny/1
    torch.manual_seed(1)
    other = create_model(ModelConfig(arch="gcl-tiny"))
    other_dir = save_model(other.clip, other.model_cfg, root / "model_b")
    (other_dir / "gcl_fields.json").write_text(json.dumps(FieldsConfig().model_dump()))

    split = f"{synth_dir}/in_domain.parquet"
    docs = pd.read_parquet(split).drop_duplicates("product_id").reset_index(drop=True)
    models = {"models:/tiny/1": root / "model", str(other_dir): other_dir}
    indexes, vectors = [], {}
    for n, (model_uri, model_dir) in enumerate(models.items()):
        encoder = RowEncoder.from_model_dir(str(model_dir))
        vectors[model_uri] = encoder.encode(docs[["title", "image"]], "right").numpy()
        embeddings = write_embeddings(
            root / f"emb{n}",
            vectors[model_uri],
            docs["product_id"].astype(str),
            {"title": docs["title"]},
            model_uri=model_uri,
        )
        build_index(IndexConfig(kind="flat", embeddings=embeddings, out=str(root / f"index{n}"), display=["title"]))
        indexes.append(str(root / f"index{n}"))
    shown = docs.copy()
    shown.loc[0, "title"] = MARKUP_TITLE
    shown.at[1, "image"] = {"bytes": b"these bytes are not an image", "path": None}
    shown.to_parquet(root / "catalog.parquet")
    return {
        "root": root,
        "uri": uri,
        "split": split,
        "indexes": indexes,
        "docs": docs,
        "models": models,
        "vectors": vectors,
        "markup_id": str(docs.loc[0, "product_id"]),
        "broken_id": str(docs.loc[1, "product_id"]),
    }


@pytest.fixture(scope="module")
def page(catalog):
    """`gcl ui` serving the two indexes with the split and the catalog; yields its base URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": catalog["uri"]}
    server = subprocess.Popen(
        [
            GCL,
            "ui",
            "--model",
            catalog["indexes"][0],
            "--model",
            catalog["indexes"][1],
            "--eval-split",
            catalog["split"],
            "--catalog",
            str(catalog["root"] / "catalog.parquet"),
            "--port",
            str(port),
        ],
        env=env,
        cwd=catalog["root"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_answers(f"{url}/api/models", server, "gcl ui")
    yield url
    server.terminate()
    server.wait(30)


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def _search(url: str, query: str, k: int = 5) -> dict:
    status, body, _ = _get(f"{url}/api/search?" + urllib.parse.urlencode({"q": query, "k": k}))
    assert status == 200, body
    return json.loads(body)


def _exact(catalog, model_uri: str, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Exact top k of each query over the model's document vectors, in this process."""
    from gcl.retrieval import RowEncoder

    encoder = RowEncoder.from_model_dir(str(catalog["models"][model_uri]))
    q = encoder.encode(pd.DataFrame({"query": queries}), "left").numpy()
    scores = q @ catalog["vectors"][model_uri].T
    ids = catalog["docs"]["product_id"].astype(str).to_numpy()
    return [[(ids[j], float(row[j])) for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def _judgments(catalog):
    from gcl.config import FieldsConfig
    from gcl.data.schema import DataConfig
    from gcl.retrieval import load_split

    queries, _, qrels = load_split([catalog["split"]], DataConfig(), FieldsConfig(), "score_linear")
    return dict(zip(queries["query"], queries["query_id"].astype(str), strict=True)), qrels


@pytest.mark.integration
def test_the_page_ranks_grades_and_scores_each_query_as_gcl_evaluates_it(catalog, page):
    """Per column, the top k are the exact search's (ids and scores, 1e-5), each result carries the
    split's grade, and NDCG@10 is gcl.metrics' (gcl evaluate's code) on the exact top 10, for a
    typed query and for every query of the split's list, which is sorted by the models' spread."""
    from gcl.metrics import evaluate

    status, body, kind = _get(f"{page}/api/models")
    assert status == 200 and json.loads(body)["models"] == catalog["indexes"] and json.loads(body)["judged"]
    text_to_id, qrels = _judgments(catalog)
    texts = sorted(text_to_id)
    exact = {m: _exact(catalog, m, texts, 10) for m in catalog["models"]}
    per_query = {}
    for m in catalog["models"]:
        run = {text_to_id[t]: dict(top) for t, top in zip(texts, exact[m], strict=True)}
        per_query[m] = evaluate(qrels, run, ["ndcg@10"], per_query=True)[1]

    answer = _search(page, texts[0], k=5)
    assert answer["judged"] and [c["label"] for c in answer["columns"]] == catalog["indexes"]
    for column, model_uri in zip(answer["columns"], catalog["models"], strict=True):
        want = exact[model_uri][0][:5]
        np.testing.assert_allclose([r["score"] for r in column["results"]], [s for _, s in want], atol=1e-5)
        assert [r["rank"] for r in column["results"]] == [1, 2, 3, 4, 5]
        grades = qrels[text_to_id[texts[0]]]
        assert [r["grade"] for r in column["results"]] == [grades.get(r["id"]) for r in column["results"]]
        assert column["ndcg@10"] == pytest.approx(per_query[model_uri][text_to_id[texts[0]]]["ndcg@10"], abs=1e-6)

    status, body, _ = _get(f"{page}/api/queries")
    table = json.loads(body)["queries"]
    assert status == 200 and sorted(row["query"] for row in table) == texts
    spreads = [row["spread"] for row in table]
    assert spreads == sorted(spreads, reverse=True) and spreads[0] > 0  # two different models differ somewhere
    for row in table:
        want = [per_query[m][text_to_id[row["query"]]]["ndcg@10"] for m in catalog["models"]]
        np.testing.assert_allclose(row["ndcg@10"], want, atol=1e-6, err_msg=row["query"])

    unjudged = _search(page, "a query the split does not hold", k=3)
    assert not unjudged["judged"] and all(c["ndcg@10"] is None for c in unjudged["columns"])
    assert all(r["grade"] is None for c in unjudged["columns"] for r in c["results"])


@pytest.mark.integration
def test_an_embedding_model_searches_its_catalog_embedded_at_start_as_its_index_does(catalog, tmp_path):
    """`--model` an embedding model (here by its registry URI) with the split as its catalog: the
    column embeds the split's documents at start and ranks as the flat index of the same model."""
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from workflows.ui import build_page

    job = parse_config(JobConfig, None, [f"mlflow.tracking_uri={catalog['uri']}", f"storage={tmp_path}/runs"])
    page = build_page(job, ["models:/tiny@champion", catalog["indexes"][0]], catalog["split"], None, str(tmp_path))
    text_to_id, _ = _judgments(catalog)
    for query in sorted(text_to_id)[:5]:
        embedded, indexed = page.search(query, 10)["columns"]
        assert [r["id"] for r in embedded["results"]] == [r["id"] for r in indexed["results"]], query
        np.testing.assert_allclose(
            [r["score"] for r in embedded["results"]], [r["score"] for r in indexed["results"]], atol=1e-5
        )
        assert embedded["ndcg@10"] == pytest.approx(indexed["ndcg@10"], abs=1e-6)
        assert all(r["title"] for r in embedded["results"])


@pytest.mark.integration
def test_the_page_refuses_bad_requests_and_shows_what_it_cannot_decode(catalog, page):
    for query, k in (("", 10), ("   ", 10), ("x" * 10_000, 10), ("shoe", 0), ("shoe", 101), ("shoe", "ten")):
        status, body, _ = _get(f"{page}/api/search?" + urllib.parse.urlencode({"q": query, "k": k}))
        assert status == 400 and json.loads(body)["error"].startswith(("q:", "k=")), (query[:20], k, body)
    for path in ("/nope", "/api/nope", "/../../etc/passwd", "/thumb/../../etc/passwd", "/gcl/search/page.py"):
        assert _get(f"{page}{path}")[0] == 404, path

    from gcl.search.page import THUMB_PIXELS, placeholder

    status, body, kind = _get(f"{page}/thumb?id={catalog['broken_id']}")
    assert status == 200 and kind == "image/png" and body == placeholder()
    status, body, kind = _get(f"{page}/thumb?id={catalog['docs'].loc[2, 'product_id']}")
    with Image.open(io.BytesIO(body)) as thumb:
        assert status == 200 and kind == "image/jpeg" and 0 < max(thumb.size) <= THUMB_PIXELS
    # A title with markup comes back as the text it is (the page sets it as text).
    titles = {r["id"]: r["title"] for c in _search(page, MARKUP_TITLE, k=100)["columns"] for r in c["results"]}
    assert titles[catalog["markup_id"]] == MARKUP_TITLE


def _chrome():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver), or a skip
    that says what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    if not (os.path.exists(driver_path) and os.path.exists(browser)):
        pytest.skip(
            "chromium and chromium-driver are not installed (Debian: apt-get install chromium chromium-driver; "
            "make test-slow installs them where it can)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.mark.integration
@pytest.mark.slow
def test_the_page_in_a_real_browser_shows_columns_thumbnails_grades_and_ndcg(catalog, page, tmp_path):
    """Headless Chromium loads the page, types a judged query and waits for the results: a column
    per model with k results, thumbnails the browser decoded, the grades and NDCG@10 that the
    JSON endpoint gives; the markup title shows as text and runs nothing; the split's queries are
    listed. A screenshot is saved and is a non-blank PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    text_to_id, _ = _judgments(catalog)
    query = sorted(text_to_id)[0]
    want = _search(page, query, k=5)
    browser = _chrome()
    try:
        browser.get(page)
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#query-list li"))
        box = browser.find_element(By.ID, "q")
        box.clear()
        box.send_keys(query)
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        browser.find_element(By.CSS_SELECTOR, "#search button").click()
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "columns").get_attribute("data-query") == query
        )
        columns = browser.find_elements(By.CSS_SELECTOR, "#columns .column")
        assert [c.find_element(By.TAG_NAME, "h2").text for c in columns] == catalog["indexes"]
        for column, expected in zip(columns, want["columns"], strict=True):
            results = column.find_elements(By.CSS_SELECTOR, ".result")
            assert [r.get_attribute("data-id") for r in results] == [r["id"] for r in expected["results"]]
            assert column.find_element(By.CLASS_NAME, "ndcg").text == f"NDCG@10 {expected['ndcg@10']:.4f}"
            grades = [r.find_element(By.CLASS_NAME, "grade").text for r in results]
            assert grades == [
                "not judged" if r["grade"] is None else f"grade {r['grade']}" for r in expected["results"]
            ]
            WebDriverWait(browser, 60).until(
                lambda b, column=column: all(
                    b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                    for img in column.find_elements(By.TAG_NAME, "img")
                )
            )
        # The markup title: typed as a query, its document is shown with the title as text.
        box.clear()
        box.send_keys(MARKUP_TITLE)
        k.clear()
        k.send_keys("100")
        browser.find_element(By.CSS_SELECTOR, "#search button").click()
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "columns").get_attribute("data-query") == MARKUP_TITLE
        )
        shown = browser.find_element(By.CSS_SELECTOR, f".result[data-id='{catalog['markup_id']}'] .title")
        assert shown.text == MARKUP_TITLE and not browser.find_elements(By.CSS_SELECTOR, ".title b")
        assert browser.execute_script("return window.pwned === undefined")
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert image.format == "PNG" and pixels.std() > 5, "a blank screenshot"
