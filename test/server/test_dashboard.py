"""GET /dashboard/data: its numbers agree with /metrics and /get_server_info, its tree shows a
few-shot prefix shared by a batch, and the API key and --dashboard-hide-prompts hold."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import Server, start_server
from dashboard_traffic import FEW_SHOT, MODEL, QUESTIONS, few_shot_batch


def scrape(url: str) -> dict[str, float]:
    values = {}
    for line in requests.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def data(server: Server) -> dict:
    r = requests.get(f"{server.url}/dashboard/data", headers=server.headers, timeout=30)
    r.raise_for_status()
    return r.json()


def walk(node: dict):
    yield node
    for child in node["children"]:
        yield from walk(child)


def test_the_page_is_one_self_contained_file(server) -> None:
    r = requests.get(f"{server.url}/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script>" in page and "/data" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing external
    assert "https://" not in page


def test_data_agrees_with_metrics_and_server_info(server) -> None:
    few_shot_batch(server.url, tag="dash-agree")
    server.wait_idle()
    time.sleep(2.5)  # two dashboard samples after the batch
    d = data(server)
    info = requests.get(f"{server.url}/get_server_info").json()
    metrics = scrape(server.url)
    label = f'{{model_name="{MODEL}"}}'
    totals, sched, kv = d["totals"], info["scheduler"], info["kv_cache"]
    for key in ("prefill_tokens", "generated_tokens", "cache_query_tokens", "cache_hit_tokens"):
        assert totals[key] == sched[key], key
    assert totals["cache_query_tokens"] == metrics[f"lmprog_prefix_cache_query_tokens{label}"]
    assert totals["cache_hit_tokens"] == metrics[f"lmprog_prefix_cache_hit_tokens{label}"]
    assert totals["prompt_tokens"] == metrics[f"lmprog_prompt_tokens_total{label}"]
    assert totals["generation_tokens"] == metrics[f"lmprog_generation_tokens_total{label}"]
    finished = sum(v for k, v in metrics.items() if k.startswith("lmprog_requests_total{"))
    assert totals["sequences"] == finished
    now = d["now"]
    assert (now["kv_total"], now["kv_free"], now["kv_evictable"]) == (
        kv["total"], kv["free"], kv["evictable"]
    )  # fmt: skip
    assert now["kv_in_use"] == kv["total"] - kv["free"] - kv["evictable"]
    assert now["running"] == now["waiting"] == 0

    # The charts' series saw the batch: tokens computed, a hit rate, latency percentiles.
    assert any(p["generated_tps"] > 0 for p in d["series"])
    assert any(p["hit_rate"] for p in d["series"] if p["hit_rate"] is not None)
    assert d["latency"] and all(p["ttft_p50"] <= p["ttft_p99"] for p in d["latency"])
    recent = {r["rid"]: r for r in d["recent"]}
    shared = [recent[f"dash-agree-{i}"] for i in range(1, len(QUESTIONS))]
    assert all(r["cached_share"] > 0.5 and r["prompt"].startswith("Answer") for r in shared)

    # The tree: the few-shot prefix is one path, reused by the batch (hits >= its questions).
    nodes = list(walk(d["tree"]))
    prefix_nodes = [n for n in nodes if (n["text"] or "").startswith(FEW_SHOT[:20])]
    assert prefix_nodes, [n["text"] for n in nodes]
    assert max(n["hits"] for n in prefix_nodes) >= len(QUESTIONS) - 1
    assert max(n["recent_hits"] for n in prefix_nodes) > 0


@pytest.fixture(scope="module")
def private() -> Server:
    return start_server("--api-key", "dash-key", "--dashboard-hide-prompts")


def test_api_key_guards_the_data_not_the_page(private) -> None:
    assert requests.get(f"{private.url}/dashboard").status_code == 200
    r = requests.get(f"{private.url}/dashboard/data")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    few_shot_batch(private.url, private.headers, tag="dash-private")
    private.wait_idle()
    d = data(private)
    assert d["hide_prompts"] is True
    assert all(node["text"] is None for node in walk(d["tree"]))
    assert d["recent"] and all(row["prompt"] is None for row in d["recent"])
    assert d["tree"]["subtree_tokens"] > 0  # hidden, not missing


# ---------------------------------------------------------------- in a real browser

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1700",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Debian's headless Chromium driven through its chromedriver (scripts/setup.sh test
    installs both); skipped, saying so, where they are missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no headless Chromium here: apt-get install chromium chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 90.0):
    """Polls `script` (JS returning a value) until it is truthy; fails with the last value."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {script!r} (last: {value!r})")


def test_the_page_updates_live_under_traffic(server, browser, tmp_path) -> None:
    stop = threading.Event()

    def traffic() -> None:
        for round_ in itertools.count():
            if stop.is_set():
                return
            few_shot_batch(server.url, tag=f"dash-live-{round_}", arithmetic=round_ % 3 == 2)

    worker = threading.Thread(target=traffic, daemon=True)
    browser.get(f"{server.url}/dashboard")
    worker.start()
    try:
        start = wait_for(browser, "return window.__dashboard.updates")
        wait_for(browser, f"return window.__dashboard.updates >= {start + 3}")
        # The charts have points, the generated-tokens series a line, the latency a bucket.
        wait_for(
            browser,
            """return [...document.querySelectorAll('svg[data-chart]')]
                             .every(s => +s.getAttribute('data-points') > 0)""",
        )
        wait_for(
            browser,
            """return +document.querySelector(
                             '#ch-throughput polyline[data-series=generated_tps]')
                             .getAttribute('data-count') >= 2""",
        )
        # The tree shows the few-shot prefix as a node the batch reused.
        prefix = FEW_SHOT[:20].replace("\\", "\\\\").replace("'", "\\'")
        hits = wait_for(
            browser,
            f"""const n = [...document.querySelectorAll('#tree g.tree-node')]
                  .find(g => g.dataset.text.startsWith('{prefix}'));
                return n && +n.dataset.hits >= {len(QUESTIONS) - 1} && +n.dataset.hits""",
        )
        assert hits >= len(QUESTIONS) - 1
        rows = browser.execute_script("return document.querySelectorAll('#recent tr').length")
        assert rows > 0
        # For a picture with more history (the README's): LMPROG_DASHBOARD_TRAFFIC_S seconds.
        time.sleep(float(os.environ.get("LMPROG_DASHBOARD_TRAFFIC_S", "0")))
    finally:
        stop.set()
        worker.join(120)
    shot = Path(os.environ.get("LMPROG_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    server.wait_idle(30)


def test_with_an_api_key_the_page_asks_for_it(private, browser) -> None:
    browser.get(f"{private.url}/dashboard")
    wait_for(browser, "return document.getElementById('keybox').style.display === 'block'")
    assert browser.execute_script("return window.__dashboard.updates") == 0
    box = browser.find_element("id", "keyinput")
    box.send_keys("dash-key")
    browser.find_element("id", "keybutton").click()
    wait_for(browser, "return window.__dashboard.updates > 0")
    assert (
        browser.execute_script("return document.getElementById('keybox').style.display") == "none"
    )
