"""/v1/completions: prompts as text or token ids, n choices each, echo and logprobs."""

from __future__ import annotations

from fastapi import APIRouter, Request

from radixserve.api.errors import bad_request
from radixserve.api.openai.common import (
    ChoicesFormatter,
    finish_reason,
    finite,
    open_generation,
    params_fields,
)
from radixserve.api.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from radixserve.api.serving import Final, GenerationJob, Sequences, off_loop, serve
from radixserve.api.state import ServerState, get_state
from radixserve.api.validate import as_batch, check_batch, check_prompt, check_text, make_params
from radixserve.engine.client import GenerateChunk

router = APIRouter()


async def _completion_prompts(
    state: ServerState, prompt, n: int
) -> tuple[list[list[int]], list[str | None]]:
    """Token ids and text of each prompt (a string, strings, ids, or lists of ids)."""
    prompt, _ = as_batch(prompt, "prompt")
    check_batch(len(prompt), n, "prompt")

    def encode() -> list[list[int]]:
        return [
            state.client.encode(check_text(p, "prompt")) if isinstance(p, str) else list(p)
            for p in prompt
        ]

    texts = [p if isinstance(p, str) else None for p in prompt]
    return await off_loop(encode), texts


def _logprobs(state: ServerState, lps: list, top_n: int, offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, lp, alts in lps:
        text = state.token_text(token_id)
        out.tokens.append(text)
        # None: the prompt's first token, which nothing precedes (OpenAI's echo shape)
        out.token_logprobs.append(None if lp is None else finite(lp))
        out.top_logprobs.append(
            {state.token_text(a): finite(alp) for a, alp in alts[:top_n]}
            if top_n and lp is not None
            else None
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out


class CompletionFormatter(ChoicesFormatter):
    """A choice is the completion's text, after its prompt when echoed."""

    prefix = "cmpl"
    response_type = CompletionResponse
    chunk_type = CompletionChunk

    def __init__(
        self, state: ServerState, req: CompletionRequest, model: str, echoes: list[str]
    ) -> None:
        super().__init__(state, model, req.stream_options, per_chunk_usage=False)
        self.want_lp = req.logprobs is not None
        self.top_n = req.logprobs or 0
        self.echoes = echoes
        self.offsets: dict[int, int] = {}

    def _echo(self, seqs: Sequences, index: int) -> str:
        return self.echoes[index // seqs.n] if self.echoes else ""

    def choice(self, seqs: Sequences, final: Final) -> CompletionChoice:
        c = final.chunk
        reason, matched = finish_reason(c)
        lps = None
        if self.want_lp:
            lps = _logprobs(
                self.state, (final.prompt_logprobs or []) + final.logprobs, self.top_n, 0
            )
        return CompletionChoice(
            index=c.index,
            text=self._echo(seqs, c.index) + c.text,
            logprobs=lps,
            finish_reason=reason,
            matched_stop=matched,
        )

    def stream_choice(self, seqs: Sequences, c: GenerateChunk) -> CompletionChoice | None:
        first = c.index not in self.offsets
        reason, matched = finish_reason(c)
        text = self._echo(seqs, c.index) + c.delta if first else c.delta
        offset = self.offsets.setdefault(c.index, 0)
        if not text and reason is None and not (self.want_lp and c.logprobs):
            return None
        lps = None
        if self.want_lp:
            echoed = (c.prompt_logprobs or []) if first else []
            lps = _logprobs(self.state, echoed + c.logprobs, self.top_n, offset)
            self.offsets[c.index] = offset + sum(len(t) for t in lps.tokens)
        return CompletionChoice(
            index=c.index, text=text, logprobs=lps, finish_reason=reason, matched_stop=matched
        )


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = get_state(request)
    model, lora = open_generation(state, req)
    job, echoes = await _job(state, req)
    job.loras = [lora] * len(job.prompts)
    return await serve(request, state, job, CompletionFormatter(state, req, model, echoes))


async def _job(state: ServerState, req: CompletionRequest) -> tuple[GenerationJob, list[str]]:
    """The request adapter: each prompt's ids, checked, one params for all; and the text
    each echoed prompt shows."""
    if req.suffix:
        raise bad_request("suffix: insertion (suffix) is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of: only best_of == n is supported", "best_of")
    ids, texts = await _completion_prompts(state, req.prompt, req.n)
    for p in ids:
        check_prompt(state.info, p, "prompt", max_tokens=req.max_tokens)
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    params = make_params(params_fields(req, max_tokens), state.info, openai_names=True)
    echoes = []
    if req.echo:
        echoes = [
            t if t is not None else state.client.tokenizer.decode(i)
            for i, t in zip(ids, texts, strict=True)
        ]
    lps = req.logprobs is not None
    job = GenerationJob.of(req, "/v1/completions", ids, [params] * len(ids), lps, req.logprobs or 0)
    if req.echo and lps:
        job.logprob_start_len = 0  # echo with logprobs: the prompt's tokens are scored too
    return job, echoes
