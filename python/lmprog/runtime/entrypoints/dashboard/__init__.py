"""The live dashboard: GET /dashboard (one self-contained page) and GET /dashboard/data (JSON).

`history.py` keeps the last minutes (the scheduler's counters sampled every second, finished
requests' latencies, the last requests); `routes.py` serves the page and its data; `page.html`
draws them with inline SVG (no library, nothing fetched from a CDN).
"""
