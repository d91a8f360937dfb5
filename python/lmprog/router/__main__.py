"""`python -m lmprog.router`: one HTTP front over several lmprog servers (data parallelism).

    python -m lmprog.router --worker-urls http://10.0.0.1:30000 http://10.0.0.2:30000 --port 8000
    python -m lmprog.router --dp-size 2 --policy cache_aware --max-total-tokens 8192   # local

With `--dp-size N` it first starts N local servers (replicas.py); every flag it does not know is
passed to each of them (`--model-path`, `--max-total-tokens`, ...).
`python -m lmprog.launch_server --dp-size N` does the same with the default policy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from lmprog.router.app import RouterConfig, build_app
from lmprog.router.http import httpx
from lmprog.router.policies import POLICY_NAMES, CacheAwareConfig
from lmprog.router.replicas import Replicas

REPLICA_START_TIMEOUT = 600.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmprog.router",
        allow_abbrev=False,
        description="Route requests across lmprog servers. Unknown flags go to the replicas "
        "that --dp-size starts.",
    )
    p.add_argument("--worker-urls", nargs="*", default=[], help="Base URLs of running servers.")
    p.add_argument("--dp-size", type=int, default=0, help="Start this many local replicas.")
    p.add_argument("--policy", default="cache_aware", choices=POLICY_NAMES)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    defaults = CacheAwareConfig()
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=defaults.cache_threshold,
        help="cache_aware: the least fraction of a request's text a worker must match to get it.",
    )
    p.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=defaults.balance_abs_threshold,
        help="cache_aware: route to the shortest queue once max - min in-flight exceeds this...",
    )
    p.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=defaults.balance_rel_threshold,
        help="... and max in-flight exceeds this times min in-flight.",
    )
    p.add_argument(
        "--max-tree-chars",
        type=int,
        default=defaults.max_tree_chars,
        help="cache_aware: characters of recent text remembered per worker.",
    )
    p.add_argument("--health-check-interval", type=float, default=5.0, help="Seconds.")
    p.add_argument(
        "--health-failure-threshold",
        type=int,
        default=2,
        help="Failed health checks in a row before a worker stops getting requests.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, server_flags = parser.parse_known_args(argv)
    if bool(ns.worker_urls) == bool(ns.dp_size):
        parser.error("give either --worker-urls or --dp-size")
    if server_flags and not ns.dp_size:
        parser.error(f"unknown flags {server_flags} (server flags go with --dp-size only)")
    if ns.dp_size < 0:
        parser.error(f"--dp-size must be >= 1, got {ns.dp_size}")
    try:
        cache_aware = CacheAwareConfig(
            ns.cache_threshold,
            ns.balance_abs_threshold,
            ns.balance_rel_threshold,
            ns.max_tree_chars,
        )
        config = RouterConfig(
            tuple(ns.worker_urls),
            ns.policy,
            cache_aware,
            ns.health_check_interval,
            ns.health_failure_threshold,
        )
    except ValueError as e:
        parser.error(str(e))
    if ns.dp_size:
        return serve_replicas(config, server_flags, ns.dp_size, ns.host, ns.port)
    return serve(config, ns.host, ns.port)


class _Server(uvicorn.Server):
    """Says where it listens once bound, and returns (exit 0) after SIGTERM/SIGINT instead of
    re-raising the signal, so that the replicas are stopped after it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            cfg = self.config
            print(f"lmprog router ready at http://{cfg.host}:{cfg.port}", flush=True)


def serve(config: RouterConfig, host: str, port: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger(httpx.__name__).setLevel(logging.WARNING)  # not a line per request
    app = build_app(config)
    settings = uvicorn.Config(app, host, port, log_level="warning", timeout_graceful_shutdown=60)
    server = _Server(settings)
    server.run()
    return 0 if server.started else 1


def serve_replicas(
    config: RouterConfig, server_flags: list[str], dp_size: int, host: str, port: int
) -> int:
    """Starts `dp_size` local servers, routes across them until SIGTERM, then stops them."""
    replicas = Replicas(server_flags, dp_size)
    try:
        replicas.wait_ready(REPLICA_START_TIMEOUT)
        config = dataclasses.replace(config, worker_urls=tuple(replicas.urls))
        code = serve(config, host, port)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    finally:
        codes = replicas.stop()
    return code or int(any(codes))


if __name__ == "__main__":
    sys.exit(main())
