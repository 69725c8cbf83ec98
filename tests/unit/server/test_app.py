"""The server's last resort for a bug: an unexpected exception in a route is answered with OpenAI's
JSON 500 on a connection that stays usable, logged with its status and counted (issue 23, item 7).

A real uvicorn on 127.0.0.1 serves an app with our middleware and one route that fails the way a
bug does; the route is this test's, the middleware and error handling are the server's own.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import generate_latest

from lorayard.server.api.errors import install_error_handlers
from lorayard.server.app import AccessLog, InternalErrors
from lorayard.server.metrics import ServerMetrics
from lorayard.testing.server import metric_value


@pytest.fixture
def buggy_server():
    metrics = ServerMetrics.create()
    app = FastAPI()

    @app.post("/v1/completions")
    async def fails() -> dict:
        raise ZeroDivisionError("a bug")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    install_error_handlers(app)
    app.add_middleware(InternalErrors)
    app.add_middleware(AccessLog, metrics=metrics)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", metrics
    server.should_exit = True
    thread.join(10)


def _counted(metrics: ServerMetrics) -> float:
    return metric_value(generate_latest(metrics.registry).decode(), "lorayard_requests_total", status="500")


def test_an_unexpected_error_is_json_500_logged_counted_and_keeps_the_connection(buggy_server, caplog):
    url, metrics = buggy_server
    caplog.set_level(logging.INFO, logger="lorayard.access")
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.post("/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 500
        assert response.json() == {
            "error": {
                "message": "internal server error",
                "type": "internal_error",
                "param": None,
                "code": "internal_error",
            }
        }
        assert response.headers.get("connection") != "close"
        # The next request on the same keep-alive connection is answered.
        for _ in range(2):
            assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json={}).status_code == 500
    # Counted once the response is sent: the client may read it a moment before.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _counted(metrics) < 2:
        time.sleep(0.02)
    assert _counted(metrics) == 2
    assert "POST /v1/completions 500" in caplog.text
    assert "ZeroDivisionError" in caplog.text  # the traceback is logged, not sent
