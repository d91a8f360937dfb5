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

_ENGINES: dict[tuple, object] = {}


def make_engine(**kwargs):
    """The engine of this configuration, made on first use and shared by every test.

    dtype defaults to float32, not `auto`: tests compare exact tokens and HF's outputs, which
    must mean the same on every CPU (auto picks bfloat16 on CPUs with AMX or AVX512-BF16)."""
    from lmprog import LLM

    kwargs.setdefault("dtype", "float32")
    key = tuple(sorted(kwargs.items()))
    if key not in _ENGINES:
        _ENGINES[key] = LLM(**kwargs)
    return _ENGINES[key]


@pytest.fixture(scope="session")
def llm():
    """The default model (SmolLM2-135M-Instruct, fp32 on CPU), shared by the whole run."""
    return make_engine(seed=0)


@pytest.fixture(scope="session")
def engine_factory():
    """Gets an engine per configuration; each is integrity-checked after every test."""
    return make_engine


@pytest.fixture(scope="session", autouse=True)
def _caches_flush_clean() -> Iterator[None]:
    """At the end, flushing each engine's prefix cache must free every KV slot."""
    yield
    for engine in _ENGINES.values():
        assert engine.reset_prefix_cache(), f"busy at the end: {engine.get_kv_stats()}"
        stats = engine.get_kv_stats()
        assert stats["free"] == stats["total"], f"slots lost after a flush: {stats}"


@pytest.fixture(autouse=True)
def _engines_balanced() -> Iterator[None]:
    yield
    for engine in _ENGINES.values():
        assert not engine.scheduler.has_work(), f"left running: {engine.get_kv_stats()}"
        engine.check_integrity()
