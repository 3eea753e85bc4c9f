"""Work that grows with the data keeps the driver's memory flat: validation, the split and an
epoch's first batch, run as `gcl` runs them on a dataset of several files (JPEG images of about
12 kB, as Marqo-GS-10M's), in a fresh driver process whose peak resident memory is read from /proc.
The figures at 20k, 200k and 1M rows are gcl.bench.scale's (docs/performance.md)."""

import json
import subprocess
import sys

import pytest

from gcl.bench.scale import write_dataset

pytestmark = pytest.mark.integration

DRIVER = """
import json, sys
import open_clip, ray, ray.data, torch  # what the stages import, loaded before the baseline is read
from gcl.bench.proc import peak_rss_mib, rss_mib
from gcl.cluster import init_ray
from gcl.job_config import JobConfig
init_ray()
baseline = rss_mib()
from gcl.config import FieldsConfig
from gcl.data.schema import DataConfig
from gcl.data.split_job import split_dataset
from gcl.data.splits import SplitConfig
from gcl.data.validate import validate_pairs
from gcl.bench.scale import run_stage

data, out = sys.argv[1], sys.argv[2]
report = validate_pairs(data, DataConfig(), FieldsConfig(), "score_linear", local_rows=0)  # as a Ray Data job
manifest = split_dataset(data, out, "query_id", "product_id", SplitConfig(seed=1), local_rows=0)  # on Ray
run_stage("first_batch", data, out)
print(json.dumps({"rows": report.rows, "bad": report.bad_rows, "train": manifest["splits"]["train"]["rows"],
                  "unused": manifest["unused_pairs"], "growth_mib": peak_rss_mib() - baseline}))
"""


@pytest.mark.slow
def test_validate_split_and_first_batch_hold_no_dataset_in_the_driver(tmp_path):
    rows = 40_000  # 8 files, about 480 MB of images
    data = write_dataset(str(tmp_path / "data"), rows)
    size_mib = sum(p.stat().st_size for p in (tmp_path / "data").glob("*.parquet")) / 2**20
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, data, str(tmp_path / "split")], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == rows and result["bad"] == 0 and 0 < result["train"] < rows
    # Beyond what Ray, torch and open_clip take to import, the work adds little to the driver, and
    # nothing like the data (about 480 MB on disk; pandas held 1.5 times that before).
    assert result["growth_mib"] < min(200, size_mib / 3), (result, size_mib)
