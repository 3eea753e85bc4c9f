"""Running on clusters: manifests valid against KubeRay's CRD schemas, the Dockerfile, `gcl submit`
to a real `ray start --head` cluster with token auth, and a 2-node training across node boundaries."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from conftest import wait_until_answers
from mlflow import MlflowClient
from ray.job_submission import JobSubmissionClient

from gcl.data.synth import SynthConfig, synthesize
from gcl.tracking.runs import runs_named

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMAS = {
    "RayJob": Path(__file__).parent / "schemas/kuberay/rayjob.schema.json",
    "RayCluster": Path(__file__).parent / "schemas/kuberay/raycluster.schema.json",
}
KUBE_MANIFESTS = sorted(p for p in CLUSTER.glob("*.yaml") if yaml.safe_load(p.read_text()).get("kind"))


def undeclared_fields(instance, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare: CRD schemas allow them, but the API server silently
    prunes them, so a misspelled field would be lost without an error."""
    found = []
    if isinstance(instance, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        properties = schema.get("properties")
        for key, value in instance.items():
            where = f"{path}.{key}" if path else key
            if properties is not None:
                if key not in properties:
                    found.append(where)
                else:
                    found += undeclared_fields(value, properties[key], where)
            elif isinstance(schema.get("additionalProperties"), dict):
                found += undeclared_fields(value, schema["additionalProperties"], where)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += undeclared_fields(item, schema["items"], f"{path}[{i}]")
    return found


def manifest_problems(manifest: dict) -> list[str]:
    schema = json.loads(SCHEMAS[manifest["kind"]].read_text())
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)
    ]
    return errors + [f"{key}: not in the {manifest['kind']} schema" for key in undeclared_fields(manifest, schema)]


def test_cluster_folder_has_the_manifests():
    assert {p.name for p in KUBE_MANIFESTS} >= {"rayjob.yaml", "raycluster.yaml"}


@pytest.mark.parametrize("path", KUBE_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifests_validate_against_the_crd_schemas(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest_problems(manifest) == []
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    images = {
        c["image"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in group["template"]["spec"]["containers"]
    }
    assert len(images) == 1 and spec["rayVersion"] == ray.__version__  # the Dockerfile's image and Ray
    assert all(
        g["template"]["spec"]["securityContext"]["runAsNonRoot"]
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    )


def test_a_wrong_field_type_or_a_misspelled_field_fails_the_schema_check():
    manifest = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    manifest["spec"]["shutdownAfterJobFinishes"] = "yes"
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    problems = manifest_problems(manifest)
    assert any("shutdownAfterJobFinishes" in p and "boolean" in p for p in problems), problems
    assert any("replicas" in p and "integer" in p for p in problems), problems
    manifest = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    manifest["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    assert manifest_problems(manifest) == ["spec.workerGroupSpecs[0].maxReplica: not in the RayCluster schema"]


def test_cluster_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_dockerfile_matches_the_pinned_ray_and_python_and_runs_as_non_root():
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line and line[0] != "#"]
    arg = {w[1].split("=")[0]: w[1].split("=", 1)[1] for w in lines if w[0] == "ARG" and "=" in w[1]}
    base = next(w[1] for w in lines if w[0] == "FROM").replace("${RAY_IMAGE}", arg.get("RAY_IMAGE", ""))
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}")
    users = [w[1] for w in lines if w[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "gcl_runs"} <= set(ignored)


def test_submit_builds_the_entrypoint_and_runtime_env(tmp_path, monkeypatch):
    from gcl.config import ConfigError
    from workflows.cli import check_command
    from workflows.submit import entrypoint, runtime_env

    assert entrypoint(["train", "-c", "a b.yaml"]) == "python -m workflows.cli train -c 'a b.yaml'"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    spec = runtime_env(str(CLUSTER / "runtime_env.yaml"), str(tmp_path), ["A=1"])
    assert spec["working_dir"] == str(tmp_path) and ".venv" in spec["excludes"]
    assert spec["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and spec["env_vars"]["A"] == "1"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        runtime_env(None, None, ["novalue"])
    with pytest.raises(ConfigError, match=r"train.epochz: unknown key.*did you mean 'epochs'"):
        check_command(["train", "-c", "workflows/configs/tiny-cpu.yaml", "--set", "train.epochz=1"], str(ROOT))
    with pytest.raises(ConfigError, match="not a gcl command"):
        check_command(["trian"], str(ROOT))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with free ports and token auth; stopped afterwards."""
    bin_dir = os.path.dirname(sys.executable)
    temp_dir = tempfile.mkdtemp(prefix="gclray", dir="/tmp")  # short: Ray's socket paths must fit
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env_agent = _free_ports(7)
    head = subprocess.Popen(
        [
            f"{bin_dir}/ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    wait_until_answers(
        f"{address}/api/version", head, "ray start --head", timeout=120, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        yield address, env, token
    finally:
        # The head and every process it started (its own process group): `ray start --block` stops
        # them gracefully on SIGTERM, one after the other, which took half a minute.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gcl(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "gcl"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_gcl_submit_runs_a_training_job_on_a_ray_head_with_token_auth(ray_head, tmp_path):
    address, head_env, token = ray_head
    data = tmp_path / "data"
    synthesize(data, SynthConfig(products=120, queries=40, docs_per_query=6, seed=4))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The client has the token but not RAY_AUTH_MODE: gcl submit turns token auth on for it.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(RAY_AUTH_TOKEN=token, MLFLOW_TRACKING_URI=uri)
    overrides = [
        "--set",
        f"data.train={data}/train.parquet",
        "--set",
        f"data.eval={{in_domain: {data}/in_domain.parquet}}",
        "--set",
        f"data.validation={{in_domain: {data}/val_in_domain.parquet}}",
        "--set",
        f"storage={tmp_path}/runs",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=16",
    ]
    common = [
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
    ]
    done = _gcl(
        *common,
        "train",
        "-c",
        "workflows/configs/tiny-cpu.yaml",
        *overrides,
        "--set",
        "name=submitted",
        env=env,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "SUCCEEDED" in done.stdout and "epoch" in done.stdout  # the job's logs streamed here
    client = MlflowClient(uri)
    runs = runs_named(client, "gcl", "submitted")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "gcl.model_uri" in runs[0].data.tags
    assert "in_domain/ndcg_at_10" in runs[0].data.metrics

    # A job that fails on the cluster (its data is not there) makes gcl submit exit non-zero.
    failed = _gcl(
        *common,
        "train",
        "-c",
        "workflows/configs/tiny-cpu.yaml",
        *overrides,
        "--set",
        "data.train=/nonexistent/train.parquet",
        "--set",
        "name=broken",
        env=env,
    )
    assert failed.returncode == 1 and "FAILED" in failed.stdout and "/nonexistent/train.parquet" in failed.stdout

    # A working directory whose `gcl` is not gcl (another project's package of that name, which
    # fails on import): the probe job finds that the cluster cannot import gcl, and nothing else is
    # submitted. (An empty package would not do: this venv's editable gcl resolves gcl.* anyway.)
    (tmp_path / "other/gcl").mkdir(parents=True)
    (tmp_path / "other/gcl/__init__.py").write_text("raise ImportError('not the gcl you are looking for')\n")
    jobs_client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    jobs_before = {job.submission_id for job in jobs_client.list_jobs()}
    shadowed = _gcl(
        "submit",
        "--address",
        address,
        "--working-dir",
        str(tmp_path / "other"),
        "--",
        "train",
        "-c",
        "workflows/configs/tiny-cpu.yaml",
        *overrides,
        "--set",
        "name=shadowed",
        env=env,
    )
    assert shadowed.returncode == 2 and "Traceback" not in shadowed.stderr, shadowed.stderr[-3000:]
    assert "cannot import gcl" in shadowed.stderr and "not the gcl you are" in shadowed.stderr, shadowed.stderr
    new_jobs = [job for job in jobs_client.list_jobs() if job.submission_id not in jobs_before]
    assert [job.metadata for job in new_jobs] == [{"gcl.probe": "imports"}]

    # Without the token the job server refuses the client.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = _gcl(*common, "config", env=no_token, timeout=120)
    assert refused.returncode != 0 and "SUCCEEDED" not in refused.stdout


MULTI_NODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.train.job import run_train

    data, out = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    job = parse_config(JobConfig, "workflows/configs/tiny-cpu.yaml", [
        f"data.train={data}/train.parquet", "data.eval={}", f"storage={out}/runs",
        f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", "name=two-nodes", "train.epochs=1",
        "train.batch_size=16", "scaling.placement_strategy=STRICT_SPREAD"])
    result = run_train(job)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({"run_id": result.run_id, "nodes": nodes, "uri": job.mlflow.resolved_uri()}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.integration
@pytest.mark.slow
def test_two_node_training_places_one_worker_per_node(tmp_path):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(products=120, queries=40, docs_per_query=6, seed=4))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", MULTI_NODE_SCRIPT, str(data), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    run = MlflowClient(result["uri"]).get_run(result["run_id"])
    workers = json.loads(run.data.tags["gcl.workers"])
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2 and {w["node_id"] for w in workers} <= set(result["nodes"])
    assert run.info.status == "FINISHED" and "train_loss" in run.data.metrics


def _non_loopback_ipv4() -> str | None:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@pytest.mark.integration
def test_the_local_clusters_dashboard_and_job_api_listen_on_loopback_only(ray_local):
    """The local cluster gcl starts: its dashboard port (which serves the job API) accepts
    connections on 127.0.0.1, answers the job API there, and refuses them on the machine's other
    address."""
    from ray._private.worker import _global_node

    host, port = _global_node.address_info["webui_url"].rsplit(":", 1)
    assert host == "127.0.0.1"
    url = f"http://127.0.0.1:{port}/api/version"
    # Ray 2.60 turns token auth on for a local cluster and keeps the token in ~/.ray/auth_token:
    # a request without it is refused, one that carries it (as Ray's clients do) is answered.
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray/auth_token")
    headers = {}
    if token_file.exists():
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url, timeout=10)
        headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        assert response.status == 200 and "ray_version" in json.loads(response.read())
    other = _non_loopback_ipv4()
    if other is None:
        pytest.skip("this machine has no address besides loopback")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other, int(port)), timeout=10).close()
