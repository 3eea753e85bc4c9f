"""Checkpoints and model references (gcl/train/checkpoint.py): DeepSpeed's files and ZeRO shards loaded
weights-only, anything else handed to gcl refused without running, references resolved or named."""

import os

import pytest
import torch

from gcl.model import (
    WEIGHTS_FILE,
    load_model,
    save_model,
)


def _touch(path):
    open(path, "w").close()


class _Payload:
    """Stands for any object a tampered checkpoint could make torch.load import and call: unpickled
    with weights_only=False, it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_deepspeed_checkpoints_load_with_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from gcl.errors import ModelError
    from gcl.train.checkpoint import load_weights_only

    torch.save({"optimizer": {"loss_scaler": LossScaler(1.0)}, "weights": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_weights_only(str(tmp_path / "ok.pt"))["weights"].tolist() == [1.0, 1.0]
    torch.save({"optimizer": _Payload(str(tmp_path / "ran"))}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=r"bad.pt: refused: .*Unsupported global: GLOBAL test_checkpoint._touch"):
        load_weights_only(str(tmp_path / "bad.pt"))
    assert not (tmp_path / "ran").exists()


def _zero_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.train.checkpoint import TrainState, save_checkpoint
    from gcl.train.engine import setup_engine
    from workflows import CONFIGS

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed asks for it; Ray Train sets it in training
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    job = parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", ["deepspeed.zero_stage=1"])
    engine, _, _ = setup_engine(job, total_steps=10)
    save_checkpoint(engine, out_dir, TrainState(), job.model_dump(mode="json"))
    if rank == 0:  # ZeRO-1 shards only the optimizer: every rank holds the whole module
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, f"{out_dir}/module.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_zero_shards_are_gathered_weights_only_and_a_shard_carrying_code_is_refused(tmp_path):
    # A real ZeRO-1 checkpoint of two gloo ranks (each rank's optimizer shard in its own file).
    import torch.multiprocessing as mp

    from gcl.errors import ModelError
    from gcl.train.checkpoint import CHECKPOINT_TAG, gather_zero_shards, load_weights_only

    mp.spawn(_zero_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    module = torch.load(tmp_path / "module.pt", weights_only=True)
    gathered = gather_zero_shards(str(tmp_path))
    assert gathered.keys() == module.keys()
    for name, weight in module.items():
        torch.testing.assert_close(gathered[name], weight.float(), atol=0, rtol=0, msg=name)

    shard = tmp_path / CHECKPOINT_TAG / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if not shard.exists():
        shard = tmp_path / CHECKPOINT_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    tampered = load_weights_only(str(shard))
    tampered["payload"] = _Payload(str(tmp_path / "ran"))
    torch.save(tampered, shard)
    with pytest.raises(ModelError, match=rf"{shard}: refused: .*test_checkpoint._touch"):
        gather_zero_shards(str(tmp_path))
    assert not (tmp_path / "ran").exists()
    # What zero_to_fp32 alone would do with the same file: the payload runs.
    torch.load(shard, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_files_handed_to_gcl_from_elsewhere_cannot_run_code(tiny, tmp_path):
    """A pickle payload planted in each file gcl reads besides checkpoints (the two tests above):
    an exported model's weights, a tower's weights, an index directory's FAISS index and id map, an
    embeddings directory's parquet. Each is refused naming the file, and the payload never runs."""
    import json
    import pickle

    import faiss

    from gcl.errors import ModelError, SearchIndexError
    from gcl.search.faiss_index import IDS_FILE, INDEX_FILE, INFO_FILE, SearchIndex, embedding_files
    from gcl.towers import load_image_weights

    marker = tmp_path / "ran"
    planted = pickle.dumps({"state_dict": _Payload(str(marker))})

    model_dir = save_model(tiny.clip, tiny.model_cfg, tmp_path / "model")
    (model_dir / WEIGHTS_FILE).write_bytes(planted)
    with pytest.raises(ModelError, match=r"refused: the weights file holds objects other than tensors"):
        load_model(model_dir)
    (tmp_path / "tower.pth").write_bytes(planted)
    with pytest.raises(ModelError, match=r"tower.pth.*not a plain state dict of tensors"):
        load_image_weights(torch.nn.Linear(2, 2), str(tmp_path / "tower.pth"))

    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / INFO_FILE).write_text(json.dumps({"id_column": "product_id", "dim": 4}))
    faiss.write_index(faiss.IndexFlatIP(4), str(index_dir / INDEX_FILE))
    (index_dir / IDS_FILE).write_bytes(planted)  # a real FAISS index, a planted id map
    with pytest.raises(SearchIndexError, match=rf"{index_dir}: cannot be read as an index"):
        SearchIndex(str(index_dir))
    (index_dir / INDEX_FILE).write_bytes(planted)  # and a planted FAISS index
    with pytest.raises(SearchIndexError, match=rf"{index_dir}: cannot be read as an index"):
        SearchIndex(str(index_dir))

    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    (embeddings / "part-0.parquet").write_bytes(planted)
    with pytest.raises(SearchIndexError, match=r"part-0.parquet: cannot be read as parquet"):
        embedding_files(str(embeddings))

    assert not marker.exists()
    pickle.loads(planted)  # the payload is live: a plain unpickling runs it
    assert marker.exists()


def test_evaluate_names_a_directory_that_holds_no_model_or_checkpoint(tmp_path):
    from gcl.errors import ModelError
    from gcl.model_refs import resolve_model_dir

    with pytest.raises(ModelError, match="not a model directory .*, a training checkpoint .* committed checkpoint"):
        resolve_model_dir(str(tmp_path), str(tmp_path / "scratch"))
