"""Scored-pair data: synthetic benchmark, split builder, readers and validation errors."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gcl.config import FieldsConfig
from gcl.data.manifest import spec_manifest
from gcl.data.readers import DataError
from gcl.data.schema import MARQO_GS_COLUMNS, SPLITS, DataConfig
from gcl.data.split_job import split_dataset
from gcl.data.splits import VALIDATION_SPLITS, SplitConfig, build_splits, unused_pairs
from gcl.data.synth import DISTINCT_QUERIES, SynthConfig, generate_pairs, synthesize
from gcl.data.validate import validate_pairs

SMALL = SynthConfig(products=120, queries=60, docs_per_query=8, seed=3)


@pytest.fixture(scope="module")
def small_pairs():
    return generate_pairs(SMALL)


def test_synth_writes_marqo_schema_splits_deterministically(tmp_path):
    first = synthesize(tmp_path / "a", SMALL)
    second = synthesize(tmp_path / "b", SMALL)
    assert {k: v["sha256"] for k, v in first["splits"].items()} == {k: v["sha256"] for k, v in second["splits"].items()}
    assert set(first["splits"]) == {"train", *SPLITS, *VALIDATION_SPLITS}
    df = pd.read_parquet(tmp_path / "a" / "train.parquet")
    assert set(MARQO_GS_COLUMNS) <= set(df.columns)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["splits"]["train"]["rows"] == len(df)
    img = Image.open(io.BytesIO(df["image"][0]["bytes"]))
    assert img.size == (64, 64)
    other = synthesize(tmp_path / "c", SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    assert other["splits"]["train"]["sha256"] != first["splits"]["train"]["sha256"]


def test_synth_positions_follow_attribute_overlap(small_pairs):
    df = small_pairs
    for _, group in df.groupby("query_id"):
        assert list(group["position"]) == list(range(1, len(group) + 1))
        np.testing.assert_allclose(group["score_reciprocal"], 1.0 / group["position"])
        assert group["score_linear"].is_monotonic_decreasing
    # Higher grades sit higher in the lists on average (noise makes it imperfect).
    corr = df.groupby("query_id").apply(lambda g: g["grade"].corr(-g["position"]), include_groups=False).mean()
    assert corr > 0.5
    # Result lists mix full and partial matches: binary relevance cannot tell them apart.
    assert df["grade"].nunique() >= 3


def test_synth_refuses_more_queries_than_its_vocabulary_has_before_drawing_any():
    # One past the number of distinct query texts used to loop forever looking for a new one.
    most = generate_pairs(SynthConfig(products=40, queries=DISTINCT_QUERIES, docs_per_query=2))
    # Every drawn query gets an id; one that matches none of the 40 products has no pairs.
    assert most["query_id"].max() == DISTINCT_QUERIES - 1
    assert most["query"].nunique() == most["query_id"].nunique() > DISTINCT_QUERIES * 0.9
    with pytest.raises(ValueError, match=f"queries={DISTINCT_QUERIES + 1}.*1 to {DISTINCT_QUERIES} distinct"):
        SynthConfig(queries=DISTINCT_QUERIES + 1)
    with pytest.raises(ValueError, match="docs_per_query=0"):
        SynthConfig(docs_per_query=0)


def test_split_builder_has_no_leakage(small_pairs):
    splits = build_splits(small_pairs, "query_id", "product_id", SplitConfig(seed=3))
    assert_no_leakage(splits, small_pairs)
    assert 0 < unused_pairs(small_pairs, splits) < len(small_pairs) * 0.1
    again = build_splits(small_pairs, "query_id", "product_id", SplitConfig(seed=3))
    assert all(again[k].equals(splits[k]) for k in splits)
    without = build_splits(
        small_pairs,
        "query_id",
        "product_id",
        SplitConfig(seed=3, validation_query_fraction=0, validation_document_fraction=0),
    )
    assert set(without) == {"train", *SPLITS}
    assert sum(len(without[p]) for p in ["train", "novel_query", "novel_document", "zero_shot"]) == len(small_pairs)
    with pytest.raises(ValueError, match="column 'qid' not in the data"):
        build_splits(small_pairs, "qid", "product_id", SplitConfig())


def assert_no_leakage(splits: dict[str, pd.DataFrame], pairs: pd.DataFrame) -> None:
    train_q, train_d = set(splits["train"].query_id), set(splits["train"].product_id)
    queries = {name: set(df.query_id) for name, df in splits.items()}
    docs = {name: set(df.product_id) for name, df in splits.items()}
    for prefix in ("", "val_"):
        for name, novel_q, novel_d in [
            ("novel_query", True, False),
            ("novel_document", False, True),
            ("zero_shot", True, True),
        ]:
            split = prefix + name
            assert queries[split].isdisjoint(train_q) == novel_q and docs[split].isdisjoint(train_d) == novel_d, split
        assert queries[prefix + "in_domain"] <= train_q and docs[prefix + "in_domain"] <= train_d
    # Held out for validation means held out of the test splits too, and the reverse: sweeps select
    # on the val_* splits and report the others. (Queries and documents seen in training are on the
    # seen side of both, as in training itself; the in-domain ones are different queries.)
    val_q = queries["val_novel_query"] | queries["val_zero_shot"]
    val_d = docs["val_novel_document"] | docs["val_zero_shot"]
    test_q = queries["novel_query"] | queries["zero_shot"]
    test_d = docs["novel_document"] | docs["zero_shot"]
    assert all(queries[s].isdisjoint(val_q) and docs[s].isdisjoint(val_d) for s in SPLITS)
    assert all(queries["val_" + s].isdisjoint(test_q) and docs["val_" + s].isdisjoint(test_d) for s in SPLITS)
    assert queries["val_in_domain"].isdisjoint(queries["in_domain"])
    # Every pair lands in exactly one of train, the cold-start splits and their val_ twins, or is
    # counted as unused (a novel query with a validation-novel document, or the reverse).
    parts = [
        "train",
        "novel_query",
        "novel_document",
        "zero_shot",
        "val_novel_query",
        "val_novel_document",
        "val_zero_shot",
    ]
    pair_ids = [pid for p in parts for pid in splits[p].pair_id]
    assert len(pair_ids) == len(set(pair_ids)) == len(pairs) - unused_pairs(pairs, splits)


# ------------------------------------------------------------------------------------------
# Validation: each problem names file, row and column.

FIELDS = FieldsConfig()


def _write(df, tmp_path, name="pairs.parquet"):
    path = tmp_path / name
    df.to_parquet(path, index=False)
    return str(path)


def _check(path, data=None, weight_key="score_linear", **kw):
    return validate_pairs(path, data or DataConfig(), FIELDS, weight_key, **kw)


def test_valid_data_passes_with_score_range(small_pairs, tmp_path):
    report = _check(_write(small_pairs, tmp_path))
    assert report.rows == len(small_pairs) and not report.bad
    assert (report.score_min, report.score_max) == (
        small_pairs.score_linear.min(),
        small_pairs.score_linear.max(),
    )


@pytest.mark.parametrize(
    "mutate, row, column, message",
    [
        (
            lambda d: d.__setitem__("score_linear", d.score_linear.where(d.index != 3, np.nan)),
            3,
            "score_linear",
            "score is missing (null or NaN)",
        ),
        (
            lambda d: d.__setitem__("score_linear", d.score_linear.where(d.index != 4, np.inf)),
            4,
            "score_linear",
            "score is inf",
        ),
        (
            lambda d: d.__setitem__("score_linear", d.score_linear.where(d.index != 5, -0.5)),
            5,
            "score_linear",
            "below 0",
        ),
        (lambda d: d.__setitem__("title", d.title.where(d.index != 6, "   ")), 6, "title", "empty text"),
        (lambda d: d.__setitem__("query", d["query"].where(d.index != 2, "")), 2, "query", "empty text"),
        (
            lambda d: d.__setitem__("pair_id", d.pair_id.where(d.index != 7, 1)),
            7,
            "pair_id",
            "duplicate pair id 1 (first at",
        ),
        (
            lambda d: d.at.__setitem__((8, "image"), {"bytes": b"not an image", "path": None}),
            8,
            "image",
            "image cannot be decoded",
        ),
        (
            lambda d: d.at.__setitem__((9, "image"), {"bytes": None, "path": "missing/nowhere.png"}),
            9,
            "image",
            "image file cannot be read",
        ),
    ],
)
def test_bad_rows_are_reported_with_file_row_and_column(small_pairs, tmp_path, mutate, row, column, message):
    df = small_pairs.copy()
    mutate(df)
    path = _write(df, tmp_path)
    with pytest.raises(DataError) as err:
        _check(path)
    text = str(err.value)
    assert re.search(rf"{re.escape(path)} row {row} column '{column}': .*{re.escape(message)}", text), text
    assert "data.on_bad_rows=skip" in text
    # With skip, the row is dropped and counted, not silently lost.
    report = _check(path, DataConfig(on_bad_rows="skip"))
    assert report.rows_valid == len(df) - 1 and (path, row) in report.bad_row_keys
    assert sum(report.reasons().values()) == 1 and report.summary().startswith(f"{len(df)} rows, 1 bad")


def test_missing_and_mistyped_columns_and_empty_data(small_pairs, tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) \['title'\]"):
        _check(_write(small_pairs.drop(columns=["title"]), tmp_path, "a.parquet"))
    bad_type = small_pairs.assign(score_linear=small_pairs.score_linear.astype(str))
    with pytest.raises(DataError, match=r"column 'score_linear' has type (large_)?string, expected a numeric type"):
        _check(_write(bad_type, tmp_path, "b.parquet"))
    with pytest.raises(DataError, match=r"column 'query' has type int64, expected string"):
        _check(_write(small_pairs.assign(query=1), tmp_path, "c.parquet"))
    with pytest.raises(DataError, match="the dataset is empty"):
        _check(_write(small_pairs.iloc[:0], tmp_path, "d.parquet"))
    with pytest.raises(DataError, match="data not found"):
        _check(str(tmp_path / "nope.parquet"))


def test_reciprocal_weights_need_positions_from_one(small_pairs, tmp_path):
    df = small_pairs.copy()
    df.loc[0, "position"] = 0
    with pytest.raises(DataError, match=r"row 0 column 'position': score 0 is below 1"):
        _check(_write(df, tmp_path), weight_key="position", min_score=1)


def test_null_field_is_missing_value_but_a_side_with_nothing_is_bad(small_pairs, tmp_path):
    df = small_pairs.copy()
    df["title"] = df["title"].astype(object)
    df.loc[1, "title"] = None  # image still there: fine
    df.loc[2, "title"] = None
    df.at[2, "image"] = None  # nothing left on the right side
    report = _check(_write(df, tmp_path), DataConfig(on_bad_rows="skip"))
    assert [(b.row, b.column) for b in report.bad] == [(2, "image/title")]


def test_csv_and_jsonl_with_image_paths(tmp_path, small_pairs):
    rows = small_pairs.head(5).copy()
    (tmp_path / "img").mkdir()
    for i, image in enumerate(rows["image"]):
        (tmp_path / "img" / f"{i}.png").write_bytes(image["bytes"])
    rows["image"] = [f"img/{i}.png" for i in range(len(rows))]
    rows.to_csv(tmp_path / "pairs.csv", index=False)
    rows.to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    for name in ("pairs.csv", "pairs.jsonl"):
        report = _check(str(tmp_path / name))
        assert report.rows == 5 and not report.bad
    rows.loc[rows.index[0], "image"] = "img/absent.png"
    rows.to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(DataError, match=r"broken.csv row 0 column 'image': image file cannot be read"):
        _check(str(tmp_path / "broken.csv"))


def _not_parquet(df, tmp_path):
    (tmp_path / "pairs.parquet").write_text("pair_id,query\n1,red tile\n")
    return "pairs.parquet"


def _truncated(df, tmp_path):
    raw = Path(_write(df, tmp_path, "whole.parquet")).read_bytes()
    (tmp_path / "pairs.parquet").write_bytes(raw[: len(raw) // 2])
    return "pairs.parquet"


def _corrupt_row_group(df, tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=40)
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 64] = b"\xff" * 64  # the page header of row group 1's first column
    path.write_bytes(bytes(raw))
    return "pairs.parquet"


def _ragged_csv(df, tmp_path):
    df = df.head(6).drop(columns=["image"]).assign(image="img/0.png")
    lines = df.to_csv(index=False).splitlines()
    lines[4] += ",one too many"  # line 5 of the file, data row 3
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return "pairs.csv"


def _broken_jsonl(df, tmp_path):
    lines = df.head(4).drop(columns=["image"]).assign(image="img/0.png").to_json(orient="records", lines=True)
    (tmp_path / "pairs.jsonl").write_text(lines.replace("}\n", "\n", 1))  # row 0 never closes
    return "pairs.jsonl"


def _image_path_is_a_directory(df, tmp_path):
    (tmp_path / "img").mkdir()
    df.head(3).drop(columns=["image"]).assign(image="img").to_csv(tmp_path / "pairs.csv", index=False)
    return "pairs.csv"


@pytest.mark.parametrize(
    "make, where, accepted",
    [
        (_not_parquet, ": cannot be read (Parquet magic bytes not found", "expected a parquet file"),
        (_truncated, ": cannot be read (Parquet magic bytes not found", "expected a parquet file"),
        (_corrupt_row_group, " row group 1 (rows 40-79): cannot be read (", "expected a parquet file"),
        (_ragged_csv, ": cannot be read (CSV parse error: line 5 (row 3): Expected", "the same number of cells"),
        (_broken_jsonl, ": cannot be read (JSON parse error", "expected a JSONL file of one JSON object per line"),
        (
            _image_path_is_a_directory,
            " row 0 column 'image': image file cannot be read (",
            "accepted: a path to an image file",
        ),
    ],
)
def test_files_that_are_not_what_they_claim_are_refused_naming_the_file_and_row(
    small_pairs, tmp_path, make, where, accepted
):
    # The error comes from validation, which every job runs before training starts.
    path = str(tmp_path / make(small_pairs, tmp_path))
    with pytest.raises(DataError) as err:
        _check(path)
    text = str(err.value)
    if make is _image_path_is_a_directory:  # a bad row: listed under the file's summary line
        text = text.splitlines()[1].strip()
    else:  # a bad file: one line
        assert "\n" not in text, text
    assert text.startswith(path + where) and accepted in text, text


def test_validation_as_a_ray_data_job_finds_what_the_local_checks_find(ray_local, small_pairs, tmp_path):
    # The same rows checked as Ray Data tasks (one per row group unit) and in this process: the
    # same rejected rows, reasons, score range and error, duplicates found across files by Ray
    # Data's groupby. Several files, so that units and duplicates cross file boundaries.
    df = small_pairs.copy()
    df["title"] = df["title"].astype(object)
    df.loc[3, "score_linear"] = np.nan
    df.loc[50, "title"] = " "
    df.loc[[70, 300], "pair_id"] = df.loc[10, "pair_id"]  # the first at row 10 of the first file
    df.at[200, "image"] = {"bytes": b"not an image", "path": None}
    df.loc[250, "title"] = None
    df.at[250, "image"] = None
    (tmp_path / "pairs").mkdir()
    for k, start in enumerate(range(0, len(df), -(-len(df) // 3))):
        part = df.iloc[start : start + -(-len(df) // 3)]
        pq.write_table(
            pa.Table.from_pandas(part, preserve_index=False), tmp_path / "pairs" / f"{k}.parquet", row_group_size=64
        )
    spec = str(tmp_path / "pairs")
    skip = DataConfig(on_bad_rows="skip")
    local = validate_pairs(spec, skip, FIELDS, "score_linear")
    on_ray = validate_pairs(spec, skip, FIELDS, "score_linear", local_rows=0)
    assert [str(b) for b in on_ray.bad] == [str(b) for b in local.bad]
    assert len(local.bad_row_keys) == local.bad_rows == on_ray.bad_rows == 6
    assert on_ray.reasons() == local.reasons() and on_ray.reasons()["pair_id: duplicate pair id"] == 2
    assert (on_ray.rows, on_ray.score_min, on_ray.score_max) == (local.rows, local.score_min, local.score_max)
    assert on_ray.bad_pair_ids == local.bad_pair_ids
    first_file = on_ray.files[0]
    assert f"duplicate pair id {int(df.pair_id[10])} (first at {first_file} row 10)" in " ".join(map(str, on_ray.bad))
    with pytest.raises(DataError) as err:
        validate_pairs(spec, DataConfig(), FIELDS, "score_linear", local_rows=0)
    assert "6 bad" in str(err.value) and "image cannot be decoded" in str(err.value)


def test_split_streams_on_ray_data_by_id_hash_as_the_in_memory_split_does(ray_local, tmp_path):
    # 24,000 pairs in three files, string document ids: the streaming split writes each split as a
    # parquet directory; it is the in-memory rule's split row for row, holds nothing out that
    # leaks, hits its fractions within sampling error and writes the same files for the same seed.
    rng = np.random.default_rng(0)
    n = 24_000
    pairs = pd.DataFrame(
        {
            "query_id": rng.integers(0, 3000, n),
            "product_id": [f"p{i}" for i in rng.integers(0, 6000, n)],
            "pair_id": np.arange(n),
            "score_linear": rng.random(n),
        }
    )
    (tmp_path / "in").mkdir()
    for k in range(3):
        pairs.iloc[k * n // 3 : (k + 1) * n // 3].to_parquet(tmp_path / "in" / f"{k}.parquet", index=False)
    cfg = SplitConfig(seed=7)
    manifest = split_dataset(str(tmp_path / "in"), str(tmp_path / "out"), "query_id", "product_id", cfg, local_rows=0)
    streamed = {
        name: pd.read_parquet(tmp_path / "out" / name).sort_values("pair_id").reset_index(drop=True)
        for name in manifest["splits"]
    }
    assert_no_leakage(streamed, pairs)
    in_memory = build_splits(pairs, "query_id", "product_id", cfg)
    for name, df in in_memory.items():
        assert df.sort_values("pair_id").reset_index(drop=True).equals(streamed[name]), name
        info = manifest["splits"][name]
        assert (info["rows"], info["queries"], info["documents"]) == (
            len(df),
            df.query_id.nunique(),
            df.product_id.nunique(),
        )
        assert info["sha256"] == spec_manifest(str(tmp_path / "out" / name))["sha256"]
    assert manifest["unused_pairs"] == unused_pairs(pairs, in_memory)
    queries = pairs.query_id.unique()
    novel = set(streamed["novel_query"].query_id) | set(streamed["zero_shot"].query_id)
    sigma = (0.2 * 0.8 / len(queries)) ** 0.5
    assert abs(len(novel) / len(queries) - 0.2) < 4 * sigma  # (queries with pairs in neither: a few)
    # Again, and in this process (small datasets): the same files, the same manifest.
    again = split_dataset(str(tmp_path / "in"), str(tmp_path / "again"), "query_id", "product_id", cfg)
    assert again == manifest
    with pytest.raises(DataError, match="column 'qid' not in the data"):
        split_dataset(str(tmp_path / "in"), str(tmp_path / "bad"), "qid", "product_id", cfg)


def test_a_quick_evaluation_samples_the_same_queries_whatever_their_order():
    from gcl.retrieval import sample_query_ids

    qrels = {str(i): {"d": 1.0} for i in range(1000)}
    chosen = sample_query_ids(qrels, 100, seed=0)
    shuffled = dict(sorted(qrels.items(), key=lambda kv: hash(kv[0])))
    assert len(chosen) == 100 and chosen == sample_query_ids(shuffled, 100, seed=0)
    assert sample_query_ids(qrels, 100, seed=1) != chosen
    assert sample_query_ids(qrels, 5000, seed=0) == set(qrels)


def test_a_directory_that_links_back_to_itself_is_read_once(small_pairs, tmp_path):
    """A symlink to a directory above it: a recursive listing follows it until the system's limit
    (the same file 40 times over, every pair id a duplicate). Each real file is read once, by its
    shortest path."""
    import os

    from gcl.data.readers import resolve_files

    (tmp_path / "pairs").mkdir()
    small_pairs.to_parquet(tmp_path / "pairs/part-0.parquet")
    os.symlink(tmp_path / "pairs", tmp_path / "pairs/again")
    assert resolve_files(str(tmp_path / "pairs")) == [str(tmp_path / "pairs/part-0.parquet")]
    report = validate_pairs(str(tmp_path / "pairs"), DataConfig(), FieldsConfig(), "score_linear")
    assert report.rows == len(small_pairs) and report.bad_rows == 0
