"""Shared test setup: offline, quiet, small and deterministic."""
import os
import warnings

os.environ.setdefault("SIMRET_OFFLINE", "1")  # nothing in the tests may reach the network
os.environ.setdefault("SIMRET_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models: one thread is fastest and avoids oversubscription when tests spawn worker processes
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    """Tests build random-init encoders on purpose; the warning is asserted where it matters."""
    from simret.models import RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


@pytest.fixture
def seed():
    import torch

    torch.manual_seed(0)
    return 0
