"""`python -m lmprog.launch_server`: the API process (FastAPI on uvicorn) and the scheduler process.

    launch_server(args)
      ├─ scheduler process: loads the model, then runs SchedulerLoop (ZMQ in / out)
      └─ this process: waits for the model, then serves HTTP; a watchdog ends the server (exit 1)
         if the scheduler process dies. SIGTERM drains in-flight requests and exits 0.

Routes: native ones in native_api.py and generate_api.py, OpenAI's in openai_api.py, a pooling
model's in embeddings_api.py, classify_api.py and score_api.py, the live dashboard's in
dashboard/; all share the TokenizerManager kept on `app.state.tm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from lmprog.lang.chat_template import derive_roles
from lmprog.runtime.entrypoints.classify_api import router as classify_router
from lmprog.runtime.entrypoints.dashboard.history import DashboardHistory
from lmprog.runtime.entrypoints.dashboard.routes import router as dashboard_router
from lmprog.runtime.entrypoints.dashboard.routes import sample_forever
from lmprog.runtime.entrypoints.embeddings_api import router as embeddings_router
from lmprog.runtime.entrypoints.errors import error_response, install_error_handlers
from lmprog.runtime.entrypoints.generate_api import router as generate_router
from lmprog.runtime.entrypoints.metrics import Metrics
from lmprog.runtime.entrypoints.metrics import router as metrics_router
from lmprog.runtime.entrypoints.native_api import router as native_router
from lmprog.runtime.entrypoints.openai_api import router as openai_router
from lmprog.runtime.entrypoints.score_api import router as score_router
from lmprog.runtime.managers.io_struct import SchedulerReady
from lmprog.runtime.managers.scheduler_process import run_scheduler_process
from lmprog.runtime.managers.tokenizer_manager import TokenizerManager
from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger("lmprog.server")
# Never behind the API key. The dashboard's page holds no data: it asks for the key itself.
OPEN_ROUTES = ("/health", "/get_model_info", "/metrics", "/dashboard")
WATCHDOG_INTERVAL = 0.5


def build_app(
    args: ServerArgs,
    ready: SchedulerReady,
    tokenizer: Any,
    inbox: str,
    outbox: str,
    scheduler_proc: mp.Process,
    on_scheduler_death: Any = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tm = TokenizerManager(args, ready, tokenizer, inbox, outbox)
        tm.metrics = Metrics(args.model_name)
        tm.start()
        app.state.tm = tm
        app.state.started = time.monotonic()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(_watch(tm))]
        if not args.disable_dashboard:
            tm.dashboard = app.state.dashboard = DashboardHistory(args.dashboard_hide_prompts)
            tasks.append(loop.create_task(sample_forever(tm, tm.dashboard)))
        yield
        for task in tasks:
            task.cancel()

    async def _watch(tm: TokenizerManager) -> None:
        while scheduler_proc.is_alive():
            await asyncio.sleep(WATCHDOG_INTERVAL)
        logger.error("the scheduler process died (exit code %s)", scheduler_proc.exitcode)
        tm.scheduler_died()
        if on_scheduler_death is not None:
            on_scheduler_death()

    app = FastAPI(title="lmprog", lifespan=lifespan)
    app.state.args = args
    app.state.model_info = ready
    app.state.tokenizer = tokenizer
    app.state.chat_roles = _chat_roles(tokenizer, args.model_name)
    install_error_handlers(app)
    app.add_middleware(_Guard, args=args)
    app.include_router(native_router)
    app.include_router(generate_router)
    app.include_router(openai_router)
    app.include_router(embeddings_router)
    app.include_router(classify_router)
    app.include_router(score_router)
    app.include_router(metrics_router)
    if not args.disable_dashboard:
        app.include_router(dashboard_router)
    return app


class _Guard:
    """ASGI middleware: the API key (constant-time compare) and the body size limit (413)."""

    def __init__(self, app: Any, args: ServerArgs) -> None:
        self.app = app
        self.key = args.api_key.encode() if args.api_key else None
        self.limit = args.max_request_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_ROUTES:
            given = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(given, self.key):
                why = "wrong" if given else "missing"
                message = f"{why} API key: send 'Authorization: Bearer KEY'"
                response = error_response(401, message, code="invalid_api_key")
                return await response(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await self._too_large(int(declared), scope, receive, send)
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # A chunked body carries no length: read it (up to the limit) before the app does.
            parts, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                parts.append(message.get("body", b""))
                size += len(parts[-1])
                more = message.get("more_body", False)
                if size > self.limit:
                    return await self._too_large(size, scope, receive, send)
            replay = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

            async def replayed() -> dict:
                return replay.pop() if replay else await receive()

            return await self.app(scope, replayed, send)
        await self.app(scope, receive, send)

    async def _too_large(self, size: int, scope: dict, receive: Any, send: Any) -> None:
        message = f"request body has {size} bytes; the limit is {self.limit} (max_request_bytes)"
        await error_response(413, message)(scope, receive, send)


class _Server(uvicorn.Server):
    """Says where it listens once the socket is bound (ready means ready), and exits 0 after a
    SIGTERM/SIGINT drained the in-flight requests (uvicorn would re-raise the signal)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # the shutdown they asked for is done

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            cfg = self.config
            print(f"lmprog server ready at http://{cfg.host}:{cfg.port}", flush=True)


def _chat_roles(tokenizer: Any, name: str) -> dict | None:
    """The model's role prefixes/suffixes (for frontend programs), from its chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    template = derive_roles(render, name)
    return template.to_dict() if template is not None else None


def launch_server(args: ServerArgs) -> int:
    """Starts the scheduler, waits for the model, serves until SIGTERM; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ipc = Path(tempfile.mkdtemp(prefix="lmprog-"))
    inbox, outbox = f"ipc://{ipc}/scheduler_in", f"ipc://{ipc}/scheduler_out"
    ctx = mp.get_context("spawn")
    ready_r, ready_w = ctx.Pipe(duplex=False)
    # Not daemonic: under tensor parallelism it starts its machine's other ranks. It exits
    # when this process is gone (it polls its parent), and is terminated below otherwise.
    proc = ctx.Process(target=run_scheduler_process, args=(args, inbox, outbox, ready_w))
    proc.start()
    print(f"loading {args.model_path} ...", flush=True)
    while not ready_r.poll(0.2):
        if not proc.is_alive():
            print(
                f"error: the scheduler exited while loading (code {proc.exitcode})", file=sys.stderr
            )
            return 1
    ready = ready_r.recv()
    if isinstance(ready, str):
        print(f"error: cannot load the model: {ready}", file=sys.stderr)
        proc.join(5)
        return 1

    from lmprog.runtime.model_loader.resolve import resolve_model
    from lmprog.runtime.model_loader.tokenizer_cache import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(args.tokenizer_path or args.model_path))
    exit_code = 0

    def on_death() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = build_app(args, ready, tokenizer, inbox, outbox, proc, on_death)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60
    )
    server = _Server(config)
    server.run()
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
    if not server.started and exit_code == 0:
        exit_code = 1  # e.g. the port was taken
    return exit_code
