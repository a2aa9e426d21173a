"""Shared test setup: offline, quiet, small and deterministic."""
import os
import warnings

os.environ.setdefault("SIMRET_OFFLINE", "1")  # nothing in the tests may reach the network
os.environ.setdefault("SIMRET_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# commands default to --precision auto (bf16 on CPUs with AMX): tests compare commands with exact fp32 library
# results, so they run at fp32 unless a test asks for a precision (tests/test_precision.py)
os.environ.setdefault("SIMRET_PRECISION", "fp32")
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


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Selenium (tests/browser_support.py; mark the module with BROWSER_MARKS)."""
    from browser_support import chromium

    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def encoder():
    """test_resnet with random weights, shared by a module's tests (modules that need another define their own)."""
    from simret.models import RandomWeightsWarning, create_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("test_resnet", weights=None)
