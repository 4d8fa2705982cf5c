"""The FastAPI app: one ServerState (engine client, readiness, drain), one ASGI middleware in
front of every route (body limit, API key, drain, counting), and the two routers.

The engine loads in the background after the app starts, so /health can answer 503 while
it loads; the process that runs the app (cli.py) watches `state.stop` to exit when loading
failed or the engine died.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixserve import __version__
from radixserve.api.errors import APIError, error_body, install_error_handlers
from radixserve.api.metrics import Metrics
from radixserve.config import ServerArgs
from radixserve.engine.client import EngineClient, EngineError
from radixserve.engine.io_struct import EngineReady

FAILURE_LINGER_S = 1.0
_GGUF_QUANT = re.compile(r"[.-](?:[QqFf][0-9][0-9A-Za-z_]*|BF16|bf16)$")


def default_served_name(model_path: str) -> str:
    """The folder or file name, without `.gguf` and a quantisation tag such as `.Q4_1`:
    SmolLM2-135M-Instruct.Q4_1.gguf is served as SmolLM2-135M-Instruct."""
    name = os.path.basename(model_path.rstrip("/"))
    if name.endswith(".gguf"):
        name = _GGUF_QUANT.sub("", name.removesuffix(".gguf"))
    return name


logger = logging.getLogger("radixserve.api")

# Probes and scrapers: no API key, still answered while draining.
OPEN_PATHS = frozenset({"/health", "/health/live", "/metrics"})


class ServerState:
    """What every route needs: the engine client and where the server is in its life."""

    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.client = EngineClient(args)
        self.info: EngineReady | None = None
        self.model_name = args.served_model_name or "loading"
        self.draining = False
        self.failure: str | None = None
        self.exit_code = 0
        self.stop = asyncio.Event()  # set: the server should exit (with exit_code)
        self.in_flight = 0
        self.open_sequences = 0  # started and not yet finished: admission control counts these
        self.queued_tokens = 0  # prompt tokens of open sequences with no output yet
        self.active_rids: set[str] = set()  # engine request ids now generating
        self.metrics = Metrics(lambda: self.client.stats, args.log_requests)
        self.metrics.open_sequences.set_function(lambda: self.open_sequences)
        self.metrics.queued_prompt_tokens.set_function(lambda: self.queued_tokens)
        self.started_at = time.time()
        self._token_text: dict[int, str] = {}

    # ---- life ----------------------------------------------------------------------------------
    async def load(self) -> None:
        try:
            info = await self.client.start()
        except Exception as e:
            self.fail(f"cannot load the model: {e}")
            return
        self.info = info
        if not self.args.served_model_name:
            self.model_name = default_served_name(info.model_path)
        kind = "embedding model" if info.is_embedding else "model"
        capacity = (
            f"{info.embedding.dimensions} dimensions"
            if info.embedding
            else f"KV cache {info.max_total_tokens} tokens"
        )
        logger.info(
            "serving %s %r (%s) on %s, %s, %s attention, context %d, %s at http://%s:%d",
            kind,
            self.model_name,
            info.model_path,
            info.device,
            info.dtype,
            info.attention_backend,
            info.context_length,
            capacity,
            self.args.host,
            self.args.port,
        )
        while self.client.dead is None:
            await asyncio.sleep(0.25)
        self.fail(f"engine died: {self.client.dead}")

    def fail(self, why: str) -> None:
        """Fatal: /health turns 503 at once and the server exits non-zero a moment later,
        so probes see the 503 and streams get their error events before the exit."""
        logger.error(why)
        self.failure = why
        self.exit_code = 1
        try:
            asyncio.get_running_loop().call_later(FAILURE_LINGER_S, self.stop.set)
        except RuntimeError:  # no loop running: nothing left to serve
            self.stop.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new work, then wait (up to `timeout`) for the requests already admitted."""
        self.draining = True
        logger.info("draining: %d request(s) in flight, up to %.0fs", self.in_flight, timeout)
        deadline = time.monotonic() + timeout
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.in_flight:
            logger.warning("shutdown timeout: %d request(s) cut off", self.in_flight)
        self.stop.set()

    def check_ready(self) -> None:
        """503 unless the engine is loaded and alive and we are not draining."""
        if self.draining:
            raise APIError(503, "server is shutting down", code="server_draining")
        if self.failure or self.client.dead:
            raise APIError(503, f"engine unavailable: {self.failure or self.client.dead}")
        if self.info is None:
            raise APIError(
                503, "model is still loading", code="model_loading", headers={"Retry-After": "5"}
            )

    def check_model(self, name: str | None) -> str:
        """The served name; None means 'the one model'. The model's path is accepted too."""
        if name is None or name in (self.model_name, self.info.model_path):
            return self.model_name
        raise APIError(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )

    def check_generation(self) -> None:
        if self.info.is_embedding:
            raise APIError(
                400,
                f"{self.model_name} is an embedding model (server started with --is-embedding); "
                "it answers /v1/embeddings only",
                code="model_not_generative",
            )

    def token_text(self, token_id: int) -> str:
        """A token as text, for logprobs (cached: the same ids come back constantly)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.client.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text


def get_state(request: Request) -> ServerState:
    return request.app.state.server


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
                    await self._reply(counted_send, *refusal)
                    return
            size = headers.get(b"content-length")
            if size is not None and size.isdigit() and int(size) > self.limit:
                await self._reply(counted_send, 413, str(BodyTooLarge(self.limit).detail))
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
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                return (
                    401,
                    "Invalid or missing API key: send `Authorization: Bearer <key>`",
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
        send: Send, status: int, message: str, code: str | None = None, headers=None
    ) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def create_app(args: ServerArgs) -> FastAPI:
    """The whole HTTP server for `args`; the engine starts with the app's lifespan."""
    from radixserve.api.native import router as native_router
    from radixserve.api.openai_api import router as openai_router

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
    app.add_middleware(ServerMiddleware, state=state)
    if args.enable_cors:  # outermost, so preflights need no API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
        )
    return app
