"""The Ray Data pipeline on a real local Ray cluster, consumed by a 2-worker TorchTrainer."""

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

from gcl.config import FieldsConfig
from gcl.data.batches import ShardReader, WaitClock, train_batches
from gcl.data.pipeline import (
    PRESENT,
    PairSource,
    PipelineConfig,
    build_dataset,
    epoch_dataset_name,
    epoch_datasets,
    equal_split_data_config,
    shuffle_mode,
)
from gcl.data.schema import DataConfig
from gcl.data.synth import SynthConfig, generate_pairs

pytestmark = pytest.mark.integration
BATCH = 16


def _consume(config):
    """A training worker's reading, for each of config["modes"] in turn: 2 epochs of its shards,
    the next epoch's reading started as this one's first batch arrives; what it saw, as JSON."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    seen = {}
    for mode in config["modes"]:

        def reader(epoch, mode=mode):
            shard = ray.train.get_dataset_shard(f"{epoch_dataset_name(epoch)}-{mode}")
            return ShardReader(shard, BATCH, local_shuffle_buffer=config["local_shuffle_buffer"][mode], seed=epoch)

        seen[mode], readers = [], {0: reader(0)}
        for epoch in range(2):
            keys, steps, queries = [], 0, []
            for batch in train_batches(readers.pop(epoch), BATCH):
                if epoch == 0 and not readers:  # as in training: the next epoch starts reading now
                    readers[1] = reader(1)
                assert len(batch["score"]) == BATCH and batch["image"].shape == (BATCH, 3, 32, 32)
                assert batch["query"].dtype == torch.int64 and batch["image" + PRESENT].dtype == torch.bool
                keys.extend(batch["pair_key"][batch["valid"]].tolist())
                queries.append(batch["query_key"][batch["valid"]].tolist())
                steps += 1
            seen[mode].append({"keys": keys, "steps": steps, "queries": queries})
    assert dist.get_world_size() == 2
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(seen, f)


def _three_file_source(tmp_path, pairs, shuffle: str, skip=frozenset(), docs_per_query: int = 1) -> PairSource:
    files = []
    for k in range(3):
        files.append(str(tmp_path / f"pairs-{k}.parquet"))
        pairs.iloc[k * len(pairs) // 3 : (k + 1) * len(pairs) // 3].to_parquet(files[-1])
    return PairSource(
        spec=str(tmp_path),
        files=tuple(files),
        data=DataConfig(),
        fields=FieldsConfig(),
        weight_key="score_linear",
        model_cfg={"arch": "gcl-tiny"},
        pipeline=PipelineConfig(
            preprocess_tasks=1,
            cpus_per_task=0.25,
            preprocess_batch_size=32,
            shuffle=shuffle,
            docs_per_query=docs_per_query,
        ),
        skip_pair_ids=frozenset(skip),
    )


def _grouped_share(batches: list[list[int]]) -> float:
    """The share of pairs whose batch holds another pair of the same query."""
    together = sum(sum(1 for q in b if b.count(q) > 1) for b in batches)
    return together / sum(len(b) for b in batches)


@pytest.mark.parametrize(
    "modes",
    [[("auto", 1), ("blocks", 1)], pytest.param([("auto", 4)], marks=pytest.mark.slow)],
    ids=["auto-1+blocks-1", "auto-4"],
)  # auto: global here
def test_full_batches_of_valid_rows_once_per_epoch_across_two_shards(ray_local, tmp_path, modes):
    """Per-epoch datasets read as training reads them, the next epoch's reading started while
    this one is consumed: full batches only, each valid row at most once per epoch and the rows
    left out fewer than a batch per rank (plus the equal split's remainder), other rows each
    epoch; ranks in lockstep, a new order; with the
    global shuffle, with the streaming one for data larger than the object store, and with
    query-grouped batches (pipeline.docs_per_query), whose batches hold runs of a query's pairs.
    One TorchTrainer reads the datasets of every mode given, one mode after the other."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    pairs = generate_pairs(SynthConfig(products=60, queries=30, docs_per_query=7, seed=5))
    skip = {int(pairs.pair_id.iloc[3]), int(pairs.pair_id.iloc[10])}  # as validation would report them
    datasets = {}
    for shuffle, docs_per_query in modes:
        (tmp_path / shuffle).mkdir()
        source = _three_file_source(tmp_path / shuffle, pairs, shuffle, skip, docs_per_query)
        assert shuffle_mode(source) == ("global" if shuffle == "auto" else "blocks")
        for name, dataset in epoch_datasets(source, epochs=2, seed=7).items():
            datasets[f"{name}-{shuffle}"] = dataset
    trainer = TorchTrainer(
        _consume,
        train_loop_config={
            "out": str(tmp_path),
            "modes": [shuffle for shuffle, _ in modes],
            "local_shuffle_buffer": {shuffle: 64 if m == 1 else 0 for shuffle, m in modes},
        },
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        datasets=datasets,
        dataset_config=equal_split_data_config(),
        run_config=RunConfig(name="pipeline-test", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    valid = set(pairs.pair_id.tolist()) - skip
    steps = len(valid) // 2 // BATCH
    assert len(valid) % (2 * BATCH) != 0  # a partial last batch: left out
    for shuffle, docs_per_query in modes:
        orders, left_out = [], []
        for epoch in range(2):
            ours = [rank[shuffle][epoch] for rank in ranks]
            keys = ours[0]["keys"] + ours[1]["keys"]
            assert len(keys) == len(set(keys)) and set(keys) <= valid, shuffle  # once at most; skipped never
            assert ours[0]["steps"] == ours[1]["steps"] == steps, shuffle  # full batches, ranks in lockstep
            orders.append(keys)
            left_out.append(valid - set(keys))
            share = _grouped_share(ours[0]["queries"] + ours[1]["queries"])
            # 7 pairs per query in 30 queries: a plain shuffle seldom puts two in one 16-pair batch.
            assert share > 0.8 if docs_per_query > 1 else share < 0.5, (shuffle, share)
        assert orders[0] != orders[1], shuffle  # a different shuffle every epoch
        assert left_out[0] != left_out[1], shuffle  # and other rows wait for the next one


def test_preprocessor_outputs_fixed_shapes_and_presence(tmp_path):
    from gcl.data.pipeline import PairPreprocessor

    pairs = generate_pairs(SynthConfig(products=20, queries=5, docs_per_query=4, seed=1)).head(6)
    pairs["title"] = pairs["title"].astype(object)
    pairs.loc[1, "title"] = None
    pre = PairPreprocessor(
        {"arch": "gcl-tiny"},
        FieldsConfig().model_dump(),
        "score_linear",
        DataConfig().model_dump(),
        None,
        augment=False,
    )
    out = pre({c: pairs[c].to_numpy() for c in pairs.columns})
    assert out["query"].shape == (6, 32) and out["image"].shape == (6, 3, 32, 32)
    assert out["title" + PRESENT].tolist() == [True, False, True, True, True, True]
    np.testing.assert_array_equal(out["pair_key"], pairs.pair_id.to_numpy())
    assert out["document_key"].dtype == np.int64 and len(set(out["document_key"])) == pairs.product_id.nunique()
    assert isinstance(pd.DataFrame({"k": out["score"]}), pd.DataFrame)


def test_augmented_crops_repeat_for_the_same_epoch_seed():
    """Random crops are drawn per pair from the epoch's seed: runs agree, epochs differ."""
    from gcl.data.pipeline import PairPreprocessor

    pairs = generate_pairs(SynthConfig(products=20, queries=5, docs_per_query=4, seed=1)).head(8)
    batch = {c: pairs[c].to_numpy() for c in pairs.columns}

    pre = PairPreprocessor(
        {"arch": "gcl-tiny"}, FieldsConfig().model_dump(), "score_linear", DataConfig().model_dump(), None, augment=True
    )

    def crops(seed):
        return pre(batch, seed=seed)["image"]

    np.testing.assert_array_equal(crops(11), crops(11))
    assert not np.array_equal(crops(11), crops(12))


@pytest.mark.parametrize("augment", [False, True])
def test_preprocessed_pixels_once_normalized_and_cached_tokens_equal_open_clips_transform_and_tokenizer(
    augment,
):
    """The trainers get uint8 pixels after the transform's resize and crop, which the model
    normalizes; with the token rows from the cache, that is exactly what open_clip's whole
    transform (image by image, the same random crops) and tokenizer give."""
    import io

    from PIL import Image

    from gcl.data.pipeline import PairPreprocessor, stable_keys
    from gcl.model import ModelConfig, create_preprocessing, normalize_pixels

    pairs = generate_pairs(SynthConfig(products=30, queries=6, docs_per_query=8, seed=2)).head(40)
    pairs["title"] = pairs["title"].astype(object)
    pairs["image"] = pairs["image"].astype(object)
    pairs.loc[3, "title"], pairs.loc[5, "image"] = None, None
    batch = {c: pairs[c].to_numpy() for c in pairs.columns}
    pre = PairPreprocessor(
        {"arch": "gcl-tiny"},
        FieldsConfig().model_dump(),
        "score_linear",
        DataConfig().model_dump(),
        None,
        augment=augment,
    )
    outputs = [pre(batch, seed=7), pre(batch, seed=7)]  # the second from the token caches
    assert set(pre.tokens["query"]._rows) == set(batch["query"])  # one cache per text field

    tokenizer, train_tf, eval_tf = create_preprocessing(ModelConfig(arch="gcl-tiny"))
    transform = train_tf if augment else eval_tf
    normalize = transform.transforms[-1]
    expected = []
    for value, key in zip(batch["image"], stable_keys(batch["pair_id"]), strict=True):
        if value is not None:
            torch.manual_seed(hash((7, int(key))) & 0x7FFF_FFFF_FFFF_FFFF)  # as the pipeline seeds a crop
            expected.append(transform(Image.open(io.BytesIO(value["bytes"])).convert("RGB")))
    for out in outputs:
        assert out["image"].dtype == np.uint8 and out["image"].shape == (40, 3, 32, 32)
        assert out["image" + PRESENT].tolist() == [i != 5 for i in range(40)] and not out["image"][5].any()
        pixels = normalize_pixels(torch.from_numpy(out["image"]), normalize.mean, normalize.std)
        torch.testing.assert_close(pixels[out["image" + PRESENT]], torch.stack(expected), rtol=0, atol=0)
        for field in ("query", "title"):
            texts = [t if isinstance(t, str) else "" for t in batch[field]]
            np.testing.assert_array_equal(out[field], tokenizer(texts).numpy())
        assert not out["title" + PRESENT][3] and out["title"].dtype == np.int64


def test_the_token_cache_tokenizes_each_text_once_and_forgets_the_least_recently_used():
    from gcl.data.pipeline import TokenCache
    from gcl.model import ModelConfig, create_preprocessing

    tokenizer = create_preprocessing(ModelConfig(arch="gcl-tiny"))[0]
    asked: list[str] = []

    def counting(texts):
        asked.extend(texts)
        return tokenizer(texts)

    cache = TokenCache(counting, max_texts=4)
    texts = ["red shoe", "blue hat", "red shoe", "a", ""]
    np.testing.assert_array_equal(cache(texts), tokenizer(texts).numpy())
    assert cache(texts).dtype == np.int64
    assert asked == ["red shoe", "blue hat", "a", ""]  # once each, across both calls
    cache(["blue hat", "green sock"])  # one text too many: "red shoe" was used least recently
    assert list(cache._rows) == ["a", "", "blue hat", "green sock"]
    assert asked[-1] == "green sock"


def test_a_shard_readers_error_reaches_the_training_thread(ray_local):
    """The first batch is fetched in the reader's thread; its error is raised where the
    trainer iterates, not lost in the thread."""
    import ray.data

    from gcl.data.readers import DataError

    def broken(batch):
        raise DataError("pair 7: image cannot be read or decoded")

    shard = ray.data.range(8).map_batches(broken).iterator()
    with pytest.raises(Exception, match="pair 7: image cannot be read"):
        list(ShardReader(shard, 4))


def test_the_wait_clock_counts_waiting_for_batches_not_the_work_between_them():
    def slow_batches():
        for i in range(3):
            time.sleep(0.05)  # the pipeline producing a batch
            yield i

    clock = WaitClock(slow_batches())
    for _ in clock:
        time.sleep(0.5)  # a training step
    # At least the pipeline's 3 x 0.05 s; far from the steps' 1.5 s even when a busy machine
    # stretches every sleep.
    assert 0.15 <= clock.seconds < 1.0


def test_the_dataset_module_does_not_import_torch():
    """Ray Data's split coordinators (one process per epoch) import gcl.data.pipeline to unpickle
    the datasets; torch there would cost each of them ~2 s of CPU and ~500 MiB."""
    import subprocess
    import sys

    code = "import sys, gcl.data.pipeline; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_batches_stay_on_the_device_they_arrived_on_and_a_partial_last_one_waits():
    """On a GPU worker Ray Data hands over batches already on the GPU: the `valid` column must be
    made there too. 'meta' stands in for the GPU these CPU machines lack. The partial batch a
    reader without drop_last would hand over last is not trained."""
    batches = [
        {"score": torch.ones(n, device="meta"), "title": torch.ones(n, 5, dtype=torch.int64, device="meta")}
        for n in (4, 4, 3)
    ]
    out = list(train_batches(batches, 4, device="meta"))
    assert len(out) == 2
    assert {k: (v.device.type, tuple(v.shape)) for k, v in out[0].items()} == {
        "score": ("meta", (4,)),
        "title": ("meta", (4, 5)),
        "valid": ("meta", (4,)),
    }


@pytest.mark.parametrize(
    ("shuffle", "docs_per_query"), [("global", 1), ("blocks", 1), pytest.param("global", 3, marks=pytest.mark.slow)]
)
def test_an_epochs_order_is_the_seeds_alone(ray_local, tmp_path, shuffle, docs_per_query):
    pairs = generate_pairs(SynthConfig(products=60, queries=30, docs_per_query=7, seed=5))
    source = _three_file_source(tmp_path, pairs, shuffle, docs_per_query=docs_per_query)

    def order(seed: int) -> list[int]:
        return [int(k) for b in build_dataset(source, seed=seed).iter_batches(batch_size=64) for k in b["pair_key"]]

    first = order(11)
    assert sorted(first) == sorted(pairs.pair_id) and first == order(11) and first != order(12)
    assert first != sorted(first)  # rows are mixed within files too
