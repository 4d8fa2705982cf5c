"""The FastAPI app: the ServerState (state.py) attached to it, one ASGI middleware in front
of every route (body limit, API key, drain, counting), and the routers.

The engine loads in the background after the app starts, so /health can answer 503 while
it loads; the process that runs the app (cli.py) watches `state.stop` to exit when loading
failed or the engine died.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixserve import __version__
from radixserve.api.anthropic import router as anthropic_router
from radixserve.api.control import router as control_router
from radixserve.api.errors import error_body, error_body_for, install_error_handlers
from radixserve.api.lora import router as lora_router
from radixserve.api.native import router as native_router
from radixserve.api.openai import router as openai_router
from radixserve.api.state import ServerState
from radixserve.api.state import default_served_name as default_served_name  # re-exported
from radixserve.config import ServerArgs
from radixserve.engine.client import EngineError

# Probes and scrapers: no API key, still answered while draining.
OPEN_PATHS = frozenset({"/health", "/health/live", "/metrics"})


class BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing lets it through instead of a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class ServerMiddleware:
    """Before any route: body-size limit, API key, drain refusal; counts in-flight requests
    (for drain) and answered requests by route and status (for /metrics)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.args.api_key
        self.key = f"Bearer {key}".encode() if key else None
        self.raw_key = key.encode() if key else None  # Anthropic's clients send x-api-key
        self.limit = state.args.max_request_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope["headers"])
        status = {"code": 500}

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if path not in OPEN_PATHS:
                refusal = self._refusal(headers)
                if refusal is not None:
                    await self._reply(counted_send, path, *refusal)
                    return
            size = headers.get(b"content-length")
            if size is not None and size.isdigit() and int(size) > self.limit:
                await self._reply(counted_send, path, 413, str(BodyTooLarge(self.limit).detail))
                return
            await self._run(scope, self._limited(receive), counted_send, path not in OPEN_PATHS)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "other"
            self.state.metrics.http_requests.labels(label, str(status["code"])).inc()

    async def _run(self, scope: Scope, receive: Receive, send: Send, counted: bool) -> None:
        if counted:
            self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if counted:
                self.state.in_flight -= 1

    def _refusal(self, headers: dict[bytes, bytes]) -> tuple[int, str, str, dict] | None:
        if self.key is not None:
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.key)
            x_api_key = hmac.compare_digest(headers.get(b"x-api-key", b""), self.raw_key)
            if not (bearer or x_api_key):
                return (
                    401,
                    "Invalid or missing API key: send `Authorization: Bearer <key>` "
                    "(or `x-api-key: <key>`)",
                    "invalid_api_key",
                    {"www-authenticate": "Bearer"},
                )
        if self.state.draining:
            return 503, "server is shutting down", "server_draining", {}
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return limited

    @staticmethod
    async def _reply(
        send: Send, path: str, status: int, message: str, code: str | None = None, headers=None
    ) -> None:
        body = json.dumps(error_body_for(path, status, message, code=code)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def create_app(args: ServerArgs) -> FastAPI:
    """The whole HTTP server for `args`; the engine starts with the app's lifespan."""
    state = ServerState(args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.stop = asyncio.Event()
        loader = asyncio.create_task(state.load())
        try:
            yield
        finally:
            state.draining = True
            loader.cancel()
            try:
                await state.client.shutdown()
            except EngineError:
                pass

    app = FastAPI(
        title="radixserve",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.server = state
    install_error_handlers(app)

    @app.get("/health/live", include_in_schema=False)
    async def health_live() -> JSONResponse:
        """Liveness, looser than /health on purpose: 200 while loading, busy or draining;
        503 only once the engine died or the watchdog gave up on it. A long engine step
        turns /health 503 (readiness takes the pod out of the Service) but must not get the
        pod restarted before the server's own watchdog (--watchdog-timeout) decides."""
        why = state.failure or state.client.dead
        if why is None:
            return JSONResponse({"status": "alive"})
        body = error_body(503, f"server is dead: {why}", code="server_dead")
        body["status"] = "dead"
        return JSONResponse(body, status_code=503)

    app.include_router(openai_router)
    app.include_router(native_router)
    app.include_router(anthropic_router)
    app.include_router(lora_router)
    app.include_router(control_router)
    app.add_middleware(ServerMiddleware, state=state)
    if args.enable_cors:  # outermost, so preflights need no API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
        )
    return app
