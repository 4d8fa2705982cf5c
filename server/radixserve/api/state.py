"""What every route needs: the engine client, where the server is in its life (loading,
serving, draining, failed), and the checks each route starts with.

Routers import it from here, not from app.py, so app.py can import the routers plainly
and no module of the API imports one that imports it back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time

from fastapi import Request

from radixserve.api.admission import Admission
from radixserve.api.errors import APIError
from radixserve.api.metrics import Metrics
from radixserve.api.store import ResponseStore
from radixserve.config import ServerArgs
from radixserve.engine.client import EngineClient
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
        self.admission = Admission(args, self.client.abort)
        self.responses = ResponseStore(args.responses_store_size)  # /v1/responses, store: true
        self.metrics = Metrics(
            lambda: self.client.stats, args.log_requests, lambda: self.model_name
        )
        self.metrics.open_sequences.set_function(lambda: self.admission.open_sequences)
        self.metrics.queued_prompt_tokens.set_function(lambda: self.admission.queued_tokens)
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
        if self._is_base(name):
            return self.model_name
        raise model_not_found(name)

    def _is_base(self, name: str | None) -> bool:
        return name is None or name in (self.model_name, self.info.model_path)

    def resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """(the name answers carry, the LoRA adapter or None for the base model) of a
        request's `model`: the base, a loaded adapter's name, or `base:adapter` (SGLang's
        form); anything else is a 404."""
        adapters = self.client.lora_adapters
        if self._is_base(name):
            return self.model_name, None
        if name in adapters:
            return name, name
        base, sep, adapter = name.rpartition(":")
        if sep and self._is_base(base) and adapter in adapters:
            return name, adapter
        raise model_not_found(name)

    def check_lora(self, name: str | None, param: str = "lora_path") -> str | None:
        """A native request's adapter name: None (base) or a loaded adapter, else 404."""
        if name is None or name in self.client.lora_adapters:
            return name
        raise APIError(
            404, f"The LoRA adapter `{name}` is not loaded.", param=param, code="model_not_found"
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


def model_not_found(name: str | None) -> APIError:
    return APIError(
        404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
    )


def get_state(request: Request) -> ServerState:
    """The state create_app attached to the app a request came to."""
    return request.app.state.server
