"""Shared fixtures: tiny real GGUF pairs (scripts/make_test_models.py) and loaded models."""
from __future__ import annotations

import os

import pytest

from spac_gguf.testing import models as testmodels

ARCHS = testmodels.ARCHS
PROMPTS = ["Hello world, this is a test", "def fibonacci(n):", "The capital of France is"]


def n_test_threads() -> int:
    return int(os.environ.get("SPAC_TEST_THREADS", min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def threads() -> int:
    return n_test_threads()


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def pair_files(arch):
    return testmodels.make_pair(arch=arch, quant="Q8_0")


@pytest.fixture(scope="module")
def loaded(pair_files, threads):
    """The arch's tiny pair loaded once per test module (target + draft, CPU)."""
    from spac_gguf.pair import load
    target, draft = pair_files
    p = load(target, draft, n_ctx=256, n_threads=threads)
    yield p
    p.close()
