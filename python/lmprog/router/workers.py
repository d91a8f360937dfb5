"""The workers behind the router: their registry, their load, and the health-check loop.

A worker is an lmprog (or any SGLang-compatible) server's base URL. The router counts the
requests it has in flight on each (`load`); it never asks the worker. A worker that fails its
health check `failure_threshold` times in a row, or refuses a connection while the router sends it
a request, leaves the routing set (healthy = False) but stays registered: the loop keeps probing it
and puts it back once `GET /health` answers 200 again. `remove` takes a worker out for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from lmprog.router.http import httpx

logger = logging.getLogger("lmprog.router")


@dataclass(eq=False)
class Worker:
    url: str
    healthy: bool = False  # until its first health check passes
    load: int = 0  # requests the router has in flight on it
    served: int = 0  # requests routed to it since it was added
    failures: int = 0  # consecutive failed health checks

    def to_dict(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "load": self.load, "served": self.served}


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class WorkerRegistry:
    """The registered workers, in the order they were added.

    `on_unhealthy(url)` is called whenever a worker leaves the routing set (failed, or removed):
    the cache-aware policy then forgets what it thought that worker had cached, since a worker
    that comes back has most likely restarted with an empty cache."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        failure_threshold: int = 2,
        check_timeout: float = 5.0,
        on_unhealthy: Callable[[str], None] | None = None,
    ) -> None:
        assert failure_threshold >= 1, f"failure_threshold must be >= 1, got {failure_threshold}"
        self.client = client
        self.failure_threshold = failure_threshold
        self.check_timeout = check_timeout
        self.on_unhealthy = on_unhealthy or (lambda url: None)
        self._workers: dict[str, Worker] = {}

    @property
    def all(self) -> list[Worker]:
        return list(self._workers.values())

    @property
    def healthy(self) -> list[Worker]:
        return [w for w in self._workers.values() if w.healthy]

    def get(self, url: str) -> Worker | None:
        return self._workers.get(normalize_url(url))

    async def add(self, url: str) -> Worker:
        """Registers `url` (again: no change) and checks its health at once."""
        url = normalize_url(url)
        worker = self._workers.setdefault(url, Worker(url))
        await self.check(worker)
        return worker

    def remove(self, url: str) -> bool:
        worker = self._workers.pop(normalize_url(url), None)
        if worker is not None:
            self.on_unhealthy(worker.url)
        return worker is not None

    def mark_failed(self, worker: Worker, why: str) -> None:
        """A request could not reach the worker: it leaves the routing set until a check passes."""
        worker.failures = max(worker.failures, self.failure_threshold)
        self._set_healthy(worker, False, why)

    async def check(self, worker: Worker) -> bool:
        try:
            r = await self.client.get(f"{worker.url}/health", timeout=self.check_timeout)
            ok, why = r.status_code == 200, f"GET /health answered {r.status_code}"
        except httpx.HTTPError as e:
            ok, why = False, f"GET /health failed: {type(e).__name__}: {e}"
        worker.failures = 0 if ok else worker.failures + 1
        if ok or worker.failures >= self.failure_threshold:
            self._set_healthy(worker, ok, why)
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.all))

    async def run_health_checks(self, interval: float) -> None:
        """Checks every worker every `interval` seconds, forever (a task the app cancels)."""
        while True:
            await asyncio.sleep(interval)
            await self.check_all()

    def _set_healthy(self, worker: Worker, healthy: bool, why: str) -> None:
        if worker.healthy == healthy:
            return
        worker.healthy = healthy
        if healthy:
            logger.info("worker %s is healthy: routing to it", worker.url)
        else:
            logger.warning("worker %s is unhealthy (%s): not routing to it", worker.url, why)
            self.on_unhealthy(worker.url)
