"""The router's HTTP front: one FastAPI app that passes each request to one worker.

    client ─► router ─ policy.select(healthy workers, routing text) ─► worker ─► reply relayed back

- Generation and pooling routes (ROUTED) go to one worker, chosen by the policy; the reply comes
  back as the worker sent it (status, body, content type), a stream chunk by chunk as it arrives.
  `X-Lmprog-Worker` names the worker that served it.
- A worker that refuses the connection leaves the routing set and the request goes to another
  (nothing reached the first, so nothing runs twice). One that fails after that answers 502, in
  OpenAI's error shape (in a stream: a last `data: {"error": ...}` event). No healthy worker: 503.
- /flush_cache and /abort_request go to every healthy worker; /get_server_info lists each one's.
- Router control, as SGLang's router: GET /health, GET /workers, POST /add_worker?url=,
  POST /remove_worker?url=.
A client that disconnects closes the worker's stream too, so the worker aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmprog.router.http import httpx
from lmprog.router.policies import CacheAwareConfig, RoutingPolicy, make_policy
from lmprog.router.request_text import routing_text
from lmprog.router.workers import Worker, WorkerRegistry
from lmprog.runtime.entrypoints.errors import (
    error_payload,
    error_response,
    install_error_handlers,
)

logger = logging.getLogger("lmprog.router")

ROUTED = (
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/encode",
    "/classify",
    "/pooling",
    "/v1/score",
    "/v1/rerank",
    "/tokenize",
    "/detokenize",
)
BROADCAST = ("/flush_cache", "/abort_request")
FORWARDED_GETS = ("/v1/models", "/get_model_info", "/health_generate", "/metrics")
# Hop-by-hop headers and those the client library sets itself are not passed on.
DROPPED_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
RELAYED_HEADERS = ("content-type", "retry-after", "cache-control")
WORKER_HEADER = "X-Lmprog-Worker"


@dataclass(frozen=True)
class RouterConfig:
    worker_urls: tuple[str, ...] = ()
    policy: str = "cache_aware"
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    health_check_interval: float = 5.0  # seconds between health checks of every worker
    health_failure_threshold: int = 2  # failed checks in a row before a worker leaves
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        make_policy(self.policy)  # fails on an unknown name, listing the known ones
        if self.health_check_interval <= 0:
            raise ValueError(
                f"health_check_interval must be > 0 seconds, got {self.health_check_interval}"
            )


class Router:
    """The state the routes share: the HTTP client, the workers and the policy."""

    def __init__(self, config: RouterConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.policy: RoutingPolicy = make_policy(config.policy, config.cache_aware)
        self.workers = WorkerRegistry(
            client,
            failure_threshold=config.health_failure_threshold,
            on_unhealthy=self.policy.forget,
        )

    def pick(self, text: str, exclude: set[str]) -> Worker | None:
        candidates = [w for w in self.workers.healthy if w.url not in exclude]
        return self.policy.select(candidates, text) if candidates else None

    def least_loaded(self) -> Worker | None:
        return min(self.workers.healthy, key=lambda w: w.load, default=None)


def build_app(config: RouterConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(None, connect=config.connect_timeout)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            router = Router(config, client)
            for url in config.worker_urls:
                await router.workers.add(url)
            app.state.router = router
            checks = asyncio.create_task(
                router.workers.run_health_checks(config.health_check_interval)
            )
            yield
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks

    app = FastAPI(title="lmprog router", lifespan=lifespan)
    install_error_handlers(app)  # its own errors (404, a bad query) in OpenAI's shape too
    _add_control_routes(app)
    for path in ROUTED:
        app.add_api_route(path, _routed_handler(path), methods=["POST"])
    for path in BROADCAST:
        app.add_api_route(path, _broadcast_handler(path), methods=["POST"])
    for path in FORWARDED_GETS:
        app.add_api_route(path, _get_handler(path), methods=["GET"])
    return app


def _router(request: Request) -> Router:
    return request.app.state.router


def _add_control_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        healthy = len(_router(request).workers.healthy)
        if healthy == 0:
            return error_response(503, "no healthy worker", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "healthy_workers": healthy})

    @app.get("/workers")
    async def workers(request: Request) -> dict:
        router = _router(request)
        return {"policy": router.policy.name, "workers": [w.to_dict() for w in router.workers.all]}

    @app.post("/add_worker")
    async def add_worker(request: Request, url: str) -> dict:
        worker = await _router(request).workers.add(url)
        return {"success": True, "worker": worker.to_dict()}

    @app.post("/remove_worker")
    async def remove_worker(request: Request, url: str) -> JSONResponse:
        if _router(request).workers.remove(url):
            return JSONResponse({"success": True})
        return error_response(404, f"no worker {url!r} is registered", "url")

    @app.get("/get_server_info")
    async def get_server_info(request: Request) -> dict:
        router = _router(request)

        async def one(worker: Worker) -> dict:
            try:
                r = await router.client.get(
                    f"{worker.url}/get_server_info", headers=_headers(request)
                )
                return {"url": worker.url, "status": r.status_code, "info": r.json()}
            except (httpx.HTTPError, ValueError) as e:
                return {"url": worker.url, "status": None, "error": f"{type(e).__name__}: {e}"}

        infos = await asyncio.gather(*(one(w) for w in router.workers.healthy))
        return {"policy": router.policy.name, "workers": list(infos)}


def _routed_handler(path: str):
    async def handler(request: Request) -> Response:
        return await _proxy(request, path)

    handler.__name__ = "route" + path.replace("/", "_")
    return handler


def _broadcast_handler(path: str):
    async def handler(request: Request) -> JSONResponse:
        router, body = _router(request), await request.body()

        async def one(worker: Worker) -> tuple[str, int | None, object]:
            url = f"{worker.url}{path}"
            try:
                r = await router.client.post(url, content=body, headers=_headers(request))
                return worker.url, r.status_code, _json_or_text(r)
            except httpx.HTTPError as e:
                return worker.url, None, f"{type(e).__name__}: {e}"

        results = await asyncio.gather(*(one(w) for w in router.workers.healthy))
        if not results:
            return error_response(503, "no healthy worker", headers={"Retry-After": "1"})
        statuses = [status for _, status, _ in results]
        status = 200 if all(s == 200 for s in statuses) else max(s or 502 for s in statuses)
        answers = [{"url": url, "status": s, "response": r} for url, s, r in results]
        return JSONResponse({"success": status == 200, "workers": answers}, status)

    handler.__name__ = "broadcast" + path.replace("/", "_")
    return handler


def _get_handler(path: str):
    async def handler(request: Request) -> Response:
        router = _router(request)
        worker = router.least_loaded()
        if worker is None:
            return error_response(503, "no healthy worker", headers={"Retry-After": "1"})
        try:
            r = await router.client.get(f"{worker.url}{path}", headers=_headers(request))
        except httpx.HTTPError as e:
            return error_response(502, f"worker {worker.url} failed: {type(e).__name__}: {e}")
        return Response(r.content, r.status_code, _relayed(r, worker))

    handler.__name__ = "forward" + path.replace("/", "_")
    return handler


async def _proxy(request: Request, path: str) -> Response:
    router, body = _router(request), await request.body()
    try:
        text = routing_text(path, json.loads(body))
    except ValueError:
        text = ""  # not JSON: the worker will say what is wrong with it
    tried: set[str] = set()
    while True:
        worker = router.pick(text, exclude=tried)
        if worker is None:
            message = "no healthy worker"
            if tried:
                message += f" (could not connect to {', '.join(sorted(tried))})"
            return error_response(503, message, headers={"Retry-After": "1"})
        worker.load += 1
        upstream_request = router.client.build_request(
            "POST",
            f"{worker.url}{path}",
            content=body,
            headers=_headers(request),
            params=list(request.query_params.multi_items()),
        )
        try:
            upstream = await router.client.send(upstream_request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            worker.load -= 1
            router.workers.mark_failed(worker, f"connect failed: {type(e).__name__}: {e}")
            tried.add(worker.url)
            continue
        except httpx.HTTPError as e:
            worker.load -= 1
            router.workers.mark_failed(worker, f"{type(e).__name__}: {e}")
            return _worker_failed(worker, e)
        except BaseException:  # the client left (cancelled) while the worker had not answered
            worker.load -= 1
            raise
        worker.served += 1
        return await _relay(router, worker, upstream)


async def _relay(router: Router, worker: Worker, upstream: httpx.Response) -> Response:
    """The worker's reply to the client: a stream chunk by chunk, anything else whole."""
    headers = _relayed(upstream, worker)
    if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
        try:
            content = await upstream.aread()
        except httpx.HTTPError as e:
            router.workers.mark_failed(worker, f"{type(e).__name__}: {e}")
            return _worker_failed(worker, e)
        finally:
            await upstream.aclose()
            worker.load -= 1
        return Response(content, upstream.status_code, headers)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_bytes():
                yield chunk
        except httpx.HTTPError as e:
            router.workers.mark_failed(worker, f"{type(e).__name__}: {e}")
            payload = error_payload(_failure_message(worker, e), 502)
            yield f"data: {json.dumps(payload)}\n\n".encode()

    released = False

    async def release() -> None:
        nonlocal released
        if not released:
            released = True
            worker.load -= 1
            await upstream.aclose()  # a worker still streaming sees the disconnect and aborts

    return _RelayedStream(chunks(), upstream.status_code, headers, release)


class _RelayedStream(StreamingResponse):
    """Runs `release` once the response ends however it ends: finished, failed, or the client
    gone (even before the first chunk, when the chunk generator never started)."""

    def __init__(self, content: Any, status: int, headers: dict, release: Any) -> None:
        super().__init__(content, status, headers)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.release()


def _worker_failed(worker: Worker, e: Exception) -> JSONResponse:
    return error_response(502, _failure_message(worker, e))


def _failure_message(worker: Worker, e: Exception) -> str:
    return f"worker {worker.url} failed during the request: {type(e).__name__}: {e}"


def _headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}


def _relayed(response: httpx.Response, worker: Worker) -> dict[str, str]:
    headers = {k: response.headers[k] for k in RELAYED_HEADERS if k in response.headers}
    headers[WORKER_HEADER] = worker.url
    return headers


def _json_or_text(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text
