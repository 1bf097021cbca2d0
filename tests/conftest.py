"Shared fixtures: seeded rng, Agg backend, figures closed after each test, no network."
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="session")
def ref():
    "The embedded HCP S1200 reference brain (loaded once per test session)."
    from cytoclr.reference import load_hcp_s1200
    return load_hcp_s1200()


def pytest_configure(config):
    "Markers of this suite: `slow` tests run only when CYTOCLR_SLOW=1 (e.g. the full ResNet-50 at 2048 px)."
    config.addinivalue_line("markers", "slow: long, memory-hungry tests, skipped unless CYTOCLR_SLOW=1")
