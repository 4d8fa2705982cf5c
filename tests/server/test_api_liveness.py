"""/health/live: the kubelet's liveness probe, looser than /health (readiness) on purpose.

No engine is started: the app is built without its lifespan and the engine's states are
set by hand, so this runs in well under a second.
"""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from radixserve.api.app import create_app
from radixserve.config import ServerArgs


def client() -> tuple[TestClient, object]:
    app = create_app(ServerArgs())
    return TestClient(app), app.state.server


def test_loading_is_alive_but_not_ready() -> None:
    http, _ = client()
    assert http.get("/health").status_code == 503
    live = http.get("/health/live")
    assert (live.status_code, live.json()["status"]) == (200, "alive")


def test_a_busy_engine_is_alive_while_readiness_fails() -> None:
    """One long engine step: no heartbeat for longer than /health allows, watchdog not fired."""
    http, state = client()
    state.info = object()  # loaded
    state.client.info = object()
    state.client.last_heartbeat = time.monotonic() - 60
    assert http.get("/health").status_code == 503
    assert http.get("/health/live").status_code == 200


def test_draining_is_alive_and_needs_no_key() -> None:
    app = create_app(ServerArgs(api_key="secret"))
    http = TestClient(app)
    app.state.server.draining = True
    assert http.get("/health/live").status_code == 200


def test_dead_engine_or_fired_watchdog_fails_liveness() -> None:
    http, state = client()
    state.client.dead = "engine made no progress for 300s"
    live = http.get("/health/live")
    assert live.status_code == 503
    assert live.json()["status"] == "dead"
    assert "no progress" in live.json()["error"]["message"]
    http, state = client()
    state.failure = "engine died: exit code -9"
    assert http.get("/health/live").status_code == 503
