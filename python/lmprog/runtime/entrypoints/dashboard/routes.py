"""GET /dashboard (the page: an open route, it holds no data) and GET /dashboard/data (JSON,
behind the API key like every other route), plus the sampler that feeds the history."""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from lmprog.runtime.entrypoints.common import tm_of
from lmprog.runtime.entrypoints.dashboard.history import SAMPLE_INTERVAL_S, DashboardHistory

logger = logging.getLogger(__name__)
router = APIRouter()
PAGE = resources.files(__package__).joinpath("page.html")


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.get("/dashboard/data")
async def dashboard_data(request: Request) -> dict[str, Any]:
    tm, app = tm_of(request), request.app
    history: DashboardHistory = app.state.dashboard
    info = await tm.get_server_info(cache_tree=True)
    kv, stats = info.kv, info.stats
    tree = info.cache_tree
    if tree is not None and history.hide_prompts:
        _strip_text(tree)
    return {
        "model": app.state.args.model_name,
        "uptime_s": round(time.monotonic() - app.state.started, 1),
        "hide_prompts": history.hide_prompts,
        "now": {
            "running": kv["running_requests"],
            "waiting": kv["waiting_requests"],
            "kv_total": kv["total"],
            "kv_free": kv["free"],
            "kv_evictable": kv["evictable"],
            "kv_in_use": kv["total"] - kv["free"] - kv["evictable"],
        },
        "totals": {
            **history.totals,
            "prefill_tokens": stats["prefill_tokens"],
            "generated_tokens": stats["generated_tokens"],
            "cache_query_tokens": stats["cache_query_tokens"],
            "cache_hit_tokens": stats["cache_hit_tokens"],
            "cache_hit_rate": stats["cache_hit_rate"],
        },
        **history.snapshot(),
        "tree": tree,
    }


def _strip_text(node: dict[str, Any]) -> None:
    node["text"] = None
    for child in node["children"]:
        _strip_text(child)


async def sample_forever(tm: Any, history: DashboardHistory) -> None:
    """Samples the scheduler's counters every SAMPLE_INTERVAL_S while the server runs."""
    while tm.alive:
        try:
            history.sample(await tm.get_server_info())
        except Exception:
            logger.debug("dashboard sample failed", exc_info=True)
        await asyncio.sleep(SAMPLE_INTERVAL_S)
