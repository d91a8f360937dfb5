"""How `--dp-size` builds its replicas' command lines, and where dp_size is refused."""

from __future__ import annotations

import os

import pytest

from lmprog.router.replicas import replica_flags, strip_flags
from lmprog.runtime.engine.engine_args import server_args_from


def test_replicas_get_their_own_port_and_a_share_of_the_cores() -> None:
    given = ["--dp-size", "2", "--port=30000", "--host", "0.0.0.0", "--max-total-tokens", "512"]
    flags = replica_flags(given, dp_size=2, port=41000)
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert flags == [
        "--max-total-tokens", "512", "--host", "127.0.0.1", "--port", "41000",
        "--cpu-threads", threads,
    ]  # fmt: skip


def test_a_given_thread_count_is_kept() -> None:
    flags = replica_flags(["--cpu-threads", "3"], dp_size=4, port=1)
    assert flags.count("--cpu-threads") == 1 and flags[flags.index("--cpu-threads") + 1] == "3"


def test_strip_flags_takes_both_spellings_and_leaves_the_rest() -> None:
    argv = ["--port", "1", "--portable", "--port=2", "x"]
    assert strip_flags(argv, ["--port"]) == ["--portable", "x"]


def test_the_offline_engine_refuses_replicas() -> None:
    with pytest.raises(ValueError, match="dp_size must be 1 in-process, got 2"):
        server_args_from(dp_size=2)
