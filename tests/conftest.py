"""Fixtures every test module shares.

The folders mirror the package: ``core``, ``attacks``, ``methods``, ``scale``, ``hf``,
``app``; ``support`` holds the helpers (tiny models, reference implementations, the
method catalogue every all-methods test iterates over). Two commands:

- ``python -m pytest -q``: everything, as CI runs it (``.ci/run``);
- ``python -m pytest -m "not slow" -q``: the fast loop while editing, without the tests
  marked ``slow`` (they compile, train or spawn processes).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the tests on one intra-op thread, restored after.

    The tests use tiny models, which gain nothing from threads, and on a shared CPU
    spinning OpenMP threads make them many times slower. Session-wide, so that a compiled
    fixture of a module sees the same thread count as its tests (dynamo guards on it).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert():
    """One tiny random BERT classifier for the tests that only call it (never train or edit it).

    Property tests draw dozens of examples each; building the model once for the session
    keeps them fast.
    """
    from tests.support.tiny_models import tiny_model

    return tiny_model("bert")
