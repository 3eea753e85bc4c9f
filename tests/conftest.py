import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them in tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray cluster for the session, bound to 127.0.0.1, 2 logical CPUs."""
    import ray

    from gcl.cluster import init_ray

    # Ray workers unpickle test functions by module name: let them import tests/.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
