"""What crosses the ZeroMQ sockets between the front (tokenizer side) and the engine process.

One dataclass per message; the engine never sees text, only token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from radixserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class FinishReason:
    """Why a request ended. Its wire shapes are written here only: `to_json` is SGLang's
    meta_info form, `type` OpenAI's finish_reason and `matched_stop` SGLang's matched_stop."""

    type: ClassVar[str]

    @property
    def matched_stop(self) -> int | str | None:
        return None

    def to_json(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class FinishStop(FinishReason):
    """A stop token id, stop string or a grammar's end matched."""

    matched: int | str
    type: ClassVar[str] = "stop"

    @property
    def matched_stop(self) -> int | str:
        return self.matched

    def to_json(self) -> dict:
        return {"type": self.type, "matched": self.matched}


@dataclass(frozen=True)
class FinishLength(FinishReason):
    """max_tokens, the context length or the KV pool ran out."""

    type: ClassVar[str] = "length"

    def to_json(self) -> dict:
        return {"type": self.type, "matched": None}


@dataclass(frozen=True)
class FinishAbort(FinishReason):
    """Aborted, timed out or refused; `status_code` is set when the engine refused a bad
    request, which the API then answers with that HTTP status instead of a finish."""

    message: str
    status_code: int | None = None
    type: ClassVar[str] = "abort"

    def to_json(self) -> dict:
        out: dict = {"type": self.type, "message": self.message}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        return out


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False
    priority: int = 0  # lower is more urgent (used under --enable-priority-scheduling)
    cache_salt: str | None = None  # prefixes are shared only within one salt
    # with return_logprob: the first prompt position whose logprob is returned (SGLang's
    # name); -1 returns only the output's
    logprob_start_len: int = -1
    lora_name: str | None = None  # the adapter to run under; None = the base model


@dataclass
class AbortReq:
    rid: str


@dataclass
class LoadLoraReq:
    """Load an adapter from `folder` (the HTTP process resolved `source` to it)."""

    rid: str
    lora_name: str
    source: str
    folder: str


@dataclass
class UnloadLoraReq:
    """Unload an adapter; answered once the requests using it finished."""

    rid: str
    lora_name: str


@dataclass
class LoraReply:
    """The answer to a LoadLoraReq or UnloadLoraReq, routed to the asker by `rid`."""

    rid: str
    success: bool
    message: str
    status_code: int = 200
    adapters: dict[str, str] = field(default_factory=dict)  # name -> source, after it


@dataclass
class FlushCacheReq:
    pass


@dataclass
class ShutdownReq:
    pass


@dataclass
class UpdateWeightsReq:
    """Reload the weights from `model_path` (the same architecture) in place. The engine
    drains first: it admits no new request until the running ones finish, swaps, flushes
    the prefix cache (its KV came from the old weights), then admits the queued ones."""

    rid: str
    model_path: str


@dataclass
class ProfileReq:
    """Start or stop the torch profiler in the engine process; stop writes the trace."""

    rid: str
    action: str  # "start" or "stop"
    output_dir: str | None = None


@dataclass
class ControlReply:
    """The answer to an UpdateWeightsReq or ProfileReq, matched by `rid`."""

    rid: str
    ok: bool
    message: str
    path: str | None = None  # a written trace, the weights now loaded


@dataclass
class ReqOutput:
    """New tokens of one request in one step (and, when it ended, why)."""

    rid: str
    new_token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    # per new token: (logprob, [(token_id, logprob), ...] top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    queue_time: float | None = None  # arrival to first admission, on the first output only
    # on the first output only: per prompt position from logprob_start_len, its token's
    # logprob and top alternatives (None for position 0, which has no context)
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0
    cache_hit_tokens: int = 0  # cumulative
    prompt_tokens: int = 0  # cumulative
    generation_tokens: int = 0  # cumulative
    num_retractions: int = 0  # cumulative
    num_oom_retries: int = 0  # cumulative
    forward_steps: int = 0  # cumulative
    prefix_deferrals: int = 0  # cumulative: prompts that waited a step for a shared prefix
    # cumulative seconds of the step loop, split by phase (the offline bench's per-step profile)
    time_schedule_s: float = 0.0  # choosing the batch, building its tensors, bookkeeping
    time_forward_s: float = 0.0  # the model
    time_sample_s: float = 0.0  # penalties, grammar masks, sampling, logprobs
    time_output_s: float = 0.0  # stop checks and the outputs sent to the front
    forward_tokens: int = 0  # cumulative tokens through the model (prefill + decode)
    # LoRA (the Inference Extension's info metric): adapters resident at once, and the
    # names of adapters that running / waiting requests use
    spec_draft_tokens: int = 0  # cumulative: tokens speculative decoding drafted
    spec_accepted_tokens: int = 0  # cumulative: drafts the target model accepted
    spec_rounds: int = 0  # cumulative: verifications (a request's drafts in one step)
    max_loras: int = 0
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)

    @property
    def kv_usage(self) -> float:
        """KV slots held by requests / all slots, 0-1 (cached prefixes not counted)."""
        return self.kv_used_tokens / self.kv_total_tokens if self.kv_total_tokens else 0.0


@dataclass
class BatchOutput:
    """What the engine loop sends after every step (also idle ones: the heartbeat)."""

    outputs: list[ReqOutput | EmbeddingOutput | LoraReply] = field(default_factory=list)
    stats: EngineStats | None = None
    flushed: bool | None = None  # answer to a FlushCacheReq
    replies: list[ControlReply] = field(default_factory=list)


@dataclass
class EngineReady:
    """Sent once after the model loaded; what the front needs to know about the engine."""

    model_path: str
    context_length: int
    vocab_size: int
    max_total_tokens: int
    max_running_requests: int
    dtype: str
    device: str
    attention_backend: str
    eos_token_ids: list[int]
    is_embedding: bool = False
    embedding: EmbeddingModelInfo | None = None  # set by an embedding engine
    quantization: str = "none"
    cpu_path: dict[str, str] | None = None  # the CPU class, the path chosen and why
    lora_adapters: dict[str, str] | None = None  # name -> source; None: LoRA is off
    speculative: dict[str, object] | None = None  # the algorithm and its draft model, if any


@dataclass
class EngineFailed:
    error: str


@dataclass
class TokenizedEmbeddingReq:
    """Embed a batch of token-id sequences (embedding mode only)."""

    rid: str
    input_ids: list[list[int]]


@dataclass
class EmbeddingOutput:
    """One vector per input sequence, or the reason none could be made."""

    rid: str
    embeddings: list[list[float]] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class EmbeddingModelInfo:
    """What an embedding engine tells the front in its EngineReady."""

    dimensions: int
    # dimensions the model was trained to be cut to (Matryoshka); None: cutting is refused
    matryoshka_dimensions: list[int] | None
    pooling: str
    normalize: bool
