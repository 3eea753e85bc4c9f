"""`gcl bench`'s measurements: performance ratios measured side by side in one run on one machine.

data      Ray Data pipeline pairs/s (1 and 2 preprocessing tasks at once) / training consumption pairs/s
pipeline  whole pipeline (Ray Data -> Ray Train -> DeepSpeed, 2 workers) pairs/s / a bare
          single-process torch loop on the same model, global batch and cores: over a whole warm
          epoch, and in its steady state (after its first batch, without the epoch's start-up);
          MFU of both (FLOPs per pair from torch's FlopCounterMode / the device's peak)
memory    per-worker peak memory, ZeRO-3 / ZeRO-0, 2 workers, a ViT-B-32-sized model: peak RSS,
          and the peak beyond what the worker held before building the model (its libraries)
cached    cached-gradient steps (train.embed_chunk): per-worker peak memory beyond the libraries
          of a batch 16x the chunk taken in chunks / a batch of one chunk (and the large batch
          whole / the chunk batch: what the chunks save); time per pair in chunks / whole
steps     the same training steps in plain processes (no Ray, no Ray Data), 2 side by side on 1
          core each: without communication, torch DDP, DeepSpeed ZeRO-0 and ZeRO-2 / the bare loop
retrieval exact top-k search queries/s / FAISS IndexFlatIP on the same embeddings (100k documents),
          and the search's extra peak memory at 1M vs 100k documents (bounded by the chunk size)

On a CUDA machine the training figures run on the GPUs in bf16 (the bare loop under autocast,
gcl's engines under DeepSpeed's torch autocast), one worker per GPU up to 2; memory is then the
per-worker peak of allocated GPU memory. On one GPU the steps section runs 1 process, and the
memory section (ZeRO-3 shards over 2 workers) is left out.

Each section is a function of gcl.bench.sections returning its figures; gcl.bench.printout prints
them with their goals. `gcl bench` (workflows/bench.py) chooses the sections and the job.
"""
