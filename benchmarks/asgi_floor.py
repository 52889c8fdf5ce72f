"""The floor under any serving figure: a six-line ASGI app under uvicorn (httptools + uvloop, as
`metarec serve` runs), answering a constant body, so benchmarks/serve_load.py measures the HTTP server,
the client and the machine alone (docs/benchmarks.md, "Serving at the limit").

    .venv/bin/python -m uvicorn benchmarks.asgi_floor:app --port 8033 --no-access-log --lifespan off &
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8033 --health --rate 200 --seconds 30
"""

from __future__ import annotations

from typing import Any

BODY = b'{"status":"ok"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer every HTTP request with ``BODY``."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
