"""SGLang's native routes: /generate, /health, /health_generate, /server_info, /flush_cache,
/abort_request, /tokenize, /detokenize, /metrics."""

from __future__ import annotations

import dataclasses
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from radixserve import __version__
from radixserve.api.errors import APIError, bad_request, error_body
from radixserve.api.protocol import (
    AbortRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from radixserve.api.serving import (
    Final,
    Formatter,
    GenerationJob,
    Sequences,
    collect,
    off_loop,
    serve,
    start_sequences,
)
from radixserve.api.state import ServerState, get_state
from radixserve.api.validate import (
    as_batch,
    check_batch,
    check_prompt,
    check_text,
    check_token_ids,
    make_params,
)
from radixserve.engine.client import EngineError, GenerateChunk
from radixserve.engine.sampling_params import SamplingParams

router = APIRouter()


# ---- generation -------------------------------------------------------------------------------
class GenerateFormatter(Formatter):
    """SGLang's shape: per sequence its cumulative text, output ids and meta_info; a stream
    event per update carries the new tokens' logprobs."""

    def __init__(self, state: ServerState, single: bool) -> None:
        self.state = state
        self.single = single  # one prompt, n=1: the object itself, not a list of one

    def _output(
        self, seqs: Sequences, c: GenerateChunk, lps: list, prompt_lps: list | None = None
    ) -> dict:
        meta = c.meta_info()
        meta["e2e_latency"] = time.perf_counter() - seqs.arrival
        text = self.state.token_text
        if prompt_lps is not None:
            meta["input_token_logprobs"] = [[lp, t, text(t)] for t, lp, _ in prompt_lps]
            meta["input_top_logprobs"] = [
                [[alp, a, text(a)] for a, alp in alts] if lp is not None else None
                for _, lp, alts in prompt_lps
            ]
        if lps:
            meta["output_token_logprobs"] = [[lp, t, text(t)] for t, lp, _ in lps]
            meta["output_top_logprobs"] = [
                [[alp, a, text(a)] for a, alp in alts] for _, _, alts in lps
            ]
        return {"text": c.text, "output_ids": c.output_ids, "meta_info": meta, "index": c.index}

    def response(self, seqs: Sequences, finals: list[Final]) -> dict | list[dict]:
        outs = [self._output(seqs, f.chunk, f.logprobs, f.prompt_logprobs) for f in finals]
        return outs[0] if self.single else outs

    def event(self, seqs: Sequences, chunk: GenerateChunk) -> dict:
        return self._output(seqs, chunk, chunk.logprobs, chunk.prompt_logprobs)


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request):
    state = get_state(request)
    state.check_ready()
    state.check_generation()
    job, single = await _job(state, req)
    return await serve(request, state, job, GenerateFormatter(state, single))


async def _job(state: ServerState, req: GenerateRequest) -> tuple[GenerationJob, bool]:
    """The request adapter: text or ids, one params per prompt (or one for all); and whether
    the answer is one object (one prompt, n=1) rather than a list."""
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text or input_ids", "text")
    param = "text" if req.text is not None else "input_ids"
    prompts, single = as_batch(req.text if req.text is not None else req.input_ids, param)
    if req.text is not None:
        texts = prompts
        check_batch(len(texts), 1, param)
        prompts = await off_loop(lambda: [state.client.encode(check_text(t, param)) for t in texts])
    sp = req.sampling_params
    if isinstance(sp, list) and len(sp) != len(prompts):
        raise bad_request("sampling_params: need one entry per prompt", "sampling_params")
    dicts = sp if isinstance(sp, list) else [sp or {}] * len(prompts)
    params: list[SamplingParams] = [make_params(d, state.info, openai_names=False) for d in dicts]
    if len({p.n for p in params}) > 1:
        raise bad_request("sampling_params: n must be the same for every prompt", "n")
    check_batch(len(prompts), params[0].n, param)
    for ids, p in zip(prompts, params, strict=True):
        check_prompt(
            state.info, ids, param, max_tokens=p.max_new_tokens, max_param="max_new_tokens"
        )
    job = GenerationJob.of(
        req, "/generate", prompts, params, req.return_logprob, req.top_logprobs_num
    )
    if req.return_logprob:
        job.logprob_start_len = req.logprob_start_len
    loras = req.lora_path if isinstance(req.lora_path, list) else [req.lora_path] * len(prompts)
    if len(loras) != len(prompts):
        raise bad_request("lora_path: need one entry per prompt", "lora_path")
    job.loras = [state.check_lora(name) for name in loras]
    return job, single and params[0].n == 1


# ---- health -------------------------------------------------------------------------------------
def _status(state: ServerState) -> str:
    if state.failure or state.client.dead:
        return "dead"
    if state.draining:
        return "draining"
    if state.info is None:
        return "loading"
    return "ok" if state.client.healthy else "stalled"


@router.get("/health")
async def health(request: Request) -> Response:
    """Cheap: what the engine client already knows, no request to the engine."""
    state = get_state(request)
    status = _status(state)
    if status == "ok":
        return JSONResponse({"status": "ok"})
    body = error_body(503, f"server is {status}", code=f"server_{status}")
    body["status"] = status
    return JSONResponse(body, status_code=503)


@router.get("/health_generate")
async def health_generate(request: Request) -> dict:
    """A real one-token pass through the engine (or one embedding)."""
    state = get_state(request)
    state.check_ready()
    try:
        if state.info.is_embedding:
            await state.client.embed([state.client.encode("ping")])
        else:
            params = SamplingParams(max_new_tokens=1, temperature=0.0)
            job = GenerationJob([state.client.encode("ping")], [params], "/health_generate")
            await collect(await start_sequences(state, job))
    except EngineError as e:
        raise APIError(503, f"engine unavailable: {e}", code="engine_error") from e
    return {"status": "ok"}


# ---- server management --------------------------------------------------------------------------
@router.get("/server_info")
async def server_info(request: Request) -> dict:
    state = get_state(request)
    info = dataclasses.asdict(state.info) if state.info else None
    return {
        **state.args.public_dict(),
        "version": __version__,
        "served_model_name": state.model_name,
        "status": _status(state),
        "engine": info,
        "engine_pid": state.client.pid,
        "stats": dataclasses.asdict(state.client.stats),
        "lora_adapters": state.client.lora_adapters if state.args.enable_lora else None,
        "in_flight_requests": state.in_flight,
    }


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> dict:
    state = get_state(request)
    state.check_ready()
    try:
        ok = await state.client.flush_cache()
    except EngineError as e:
        raise APIError(503, f"engine unavailable: {e}", code="engine_error") from e
    if not ok:
        raise APIError(
            400, "cache not flushed: requests are running; retry when idle", code="engine_busy"
        )
    return {"success": True, "message": "cache flushed"}


@router.post("/abort_request")
async def abort_request(req: AbortRequest, request: Request) -> dict:
    """Abort by the rid a request was sent with (all its n sequences), or everything."""
    state = get_state(request)
    state.check_ready()
    if not req.abort_all and not req.rid:
        raise bad_request("rid: give a request id, or abort_all=true", "rid")
    hits = state.admission.running(None if req.abort_all else req.rid)
    for r in hits:
        state.client.abort(r)
    return {"aborted": hits}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    state = get_state(request)
    state.check_ready()
    state.check_model(req.model)
    text = req.prompt if req.prompt is not None else req.text
    if text is None:
        raise bad_request("prompt: required", "prompt")
    ids = await off_loop(
        state.client.tokenizer.encode,
        check_text(text, "prompt" if req.prompt is not None else "text"),
        add_special_tokens=req.add_special_tokens,
    )
    return {"tokens": ids, "count": len(ids), "max_model_len": state.info.context_length}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    state = get_state(request)
    state.check_ready()
    state.check_model(req.model)
    check_token_ids(req.tokens, state.info.vocab_size, "tokens")
    return {"text": state.client.tokenizer.decode(req.tokens)}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
