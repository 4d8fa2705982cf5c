"""Shared fixtures for the HTTP API tests (test_api_*.py)."""

from __future__ import annotations

import pytest
from api_harness import DEFAULT_FLAGS, Server, start_server


@pytest.fixture(scope="session")
def api_server() -> Server:
    """One generation server on the default model for every API test that needs no
    special flags (started once: the model load is the slow part)."""
    server = start_server(*DEFAULT_FLAGS, "--log-requests")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()
