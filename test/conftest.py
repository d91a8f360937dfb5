"""Shared fixtures: one engine per configuration for the whole run (loading costs seconds), and
after every test a check that nothing is left running or locked and the KV accounting balances."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

_ENGINES: list = []


def make_engine(**kwargs):
    from lmprog import LLM

    llm = LLM(**kwargs)
    _ENGINES.append(llm)
    return llm


@pytest.fixture(scope="session")
def llm():
    """The default model (SmolLM2-135M-Instruct, fp32 on CPU), shared by the whole run."""
    return make_engine(seed=0)


@pytest.fixture(scope="session")
def engine_factory():
    """Makes extra engine configurations; each is integrity-checked after every test."""
    return make_engine


@pytest.fixture(autouse=True)
def _engines_balanced() -> Iterator[None]:
    yield
    for engine in _ENGINES:
        assert not engine.scheduler.has_work(), f"left running: {engine.get_kv_stats()}"
        engine.check_integrity()
