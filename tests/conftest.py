import os

import pytest
import torch

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# Tests of trial configs see the built-in and profile defaults, not the adopted ones d3tune
# ships (tests/test_adopted.py checks those on their own); inherited by subprocesses and Ray.
os.environ.setdefault("D3TUNE_SHIPPED_DEFAULTS", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_digits():
    """A small slice of the default dataset, so trial-level tests run in seconds."""
    from d3tune.data import Dataset, load_dataset

    d = load_dataset("digits")
    return Dataset(d.name, d.x_train[:400], d.y_train[:400], d.x_test[:150], d.y_test[:150],
                   d.num_classes, d.mean, d.std, d.hflip)


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for a test module (2 CPUs, like CI's machine); stopped afterwards."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
