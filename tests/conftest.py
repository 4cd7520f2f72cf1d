"""Fixtures every test module shares.

The folders mirror the package: ``core``, ``attacks``, ``methods``, ``scale``, ``hf``,
``app``; ``support`` holds the helpers (tiny models, reference implementations, the
method catalogue every all-methods test iterates over). Two commands:

- ``python -m pytest -q``: everything, as CI runs it (``.ci/run``);
- ``python -m pytest -m "not slow" -q``: the fast loop while editing, without the tests
  marked ``slow`` (they compile, train or spawn processes).

Property tests draw their examples from a fixed seed (the ``repeatable`` profile), so a
run on a fresh clone tests what the last run tested; ``--hypothesis-profile=explore``
draws fresh examples each run, to hunt for new failures before a change lands.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")


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
