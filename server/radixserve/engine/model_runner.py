"""Loads the model onto its device and runs one forward step on a ForwardBatch.

Under tensor parallelism every rank has a ModelRunner. Rank 0's is driven by the scheduler:
its `forward` first broadcasts the step's batch description (token ids, positions, KV
slots, prefix/extend lengths: a few small tensors) and then runs the model; the other
ranks sit in `worker_loop`, rebuild the same ForwardBatch from that description and run
the same forward, meeting rank 0 in the all-reduces. Only rank 0 samples: the tokens it
picks reach the other ranks as the next step's input ids, so no rank needs a sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

import torch

from radixserve.config import ServerArgs
from radixserve.engine import cpu_path
from radixserve.engine.lora import LoraManager, resolve_lora_source
from radixserve.layers import cpu_decode, cpu_kernels, parallel
from radixserve.layers.attention import ForwardBatch, KVPool, create_attention_backend
from radixserve.layers.linear import SMALL_BATCH_ROWS, LinearBase
from radixserve.models import model_class
from radixserve.models.llama import LlamaForCausalLM, RMSNorm
from radixserve.models.loader import (
    ModelSource,
    gguf_linear_type,
    iter_weights,
    load_config,
    resolve_model,
)

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# the CPU's default KV pool: what max-running-requests full contexts need, within 1 GiB
# and a quarter of free memory, but always one full context (docs/engine.md)
_CPU_KV_BYTES_CAP = 1 << 30
_CPU_KV_MEMORY_FRACTION = 0.25
# what rank 0 broadcasts first each time: [kind, tokens, requests, prefill requests,
# prefill tokens, logit rows, KV slots of all requests]
_HEADER_LEN = 7
_STEP, _IDLE, _STOP = 0, 1, 2
# what /update_weights_from_disk requires to match: the shapes every buffer was sized by
_SAME_ARCHITECTURE = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 where the hardware runs it natively, else float32 (or float16)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_path.bf16_native() else torch.float32


_INT4_GGUF_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def int4_exact(source: ModelSource) -> bool:
    """The model is a 4-bit GGUF whose blocks pack into torch's int4 layout without loss."""
    return bool(source.gguf_file) and gguf_linear_type(source).startswith(_INT4_GGUF_TYPES)


def resolve_quantization(choice: str, source: ModelSource, device: str, dtype_choice: str) -> str:
    """On the CPU `auto` picks per CPU class (engine/cpu_path.py); on a GPU it is none."""
    if device.startswith("cpu"):
        exact = choice == "auto" and cpu_path.int4_available() and int4_exact(source)
        return cpu_path.choose(dtype_choice, choice, exact)[1]
    if choice in ("int4", "int8"):
        raise ValueError(
            f"--quantization {choice} runs on the CPU only (its kernels are CPU kernels)"
        )
    return "none"


class ModelRunner:
    def __init__(self, args: ServerArgs, rank: int = 0) -> None:
        self.args = args
        self.rank = rank
        self.tp_size = args.tp_size
        self.source = resolve_model(args.model_path)
        self.config = load_config(self.source)
        cfg = self.config
        # refused before joining the group, so every rank fails fast with the same reason
        model_cls = model_class(cfg)
        if args.enable_lora and model_cls is not LlamaForCausalLM:
            raise ValueError(
                "--enable-lora serves the Llama family (Llama, Mistral, Qwen2, Qwen3) only; "
                f"this model is {model_cls.__name__}"
            )
        heads, kv_heads = parallel.shard_heads(
            cfg.num_attention_heads, cfg.num_key_value_heads, self.tp_size, rank
        )
        self.device = self._rank_device(resolve_device(args.device))
        self.cpu_path: cpu_path.CpuPath | None = None
        if self.device == "cpu":
            # reading the GGUF's tensor types costs a second open: only where int4 can win
            exact = args.quantization == "auto" and cpu_path.int4_available()
            self.dtype, self.quantization, self.cpu_path = cpu_path.choose(
                args.dtype, args.quantization, exact and int4_exact(self.source)
            )
        else:
            self.dtype = resolve_dtype(args.dtype, self.device)
            self.quantization = resolve_quantization(
                args.quantization, self.source, self.device, args.dtype
            )
        self.context_length = args.context_length or int(
            getattr(cfg, "max_position_embeddings", 4096)
        )
        if self.tp_size > 1:
            if not args.dist_init_addr:
                raise ValueError("--tp-size above 1 needs --dist-init-addr (host:port of rank 0)")
            parallel.init_tensor_parallel(
                rank, self.tp_size, args.dist_init_addr, self.device, args.watchdog_timeout
            )
        self.num_heads = len(heads)  # this rank's share
        self.num_kv_heads = len(kv_heads)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.backend = self._attention_backend(model_cls)
        self.backend_name = type(self.backend).__name__.removesuffix("AttentionBackend").lower()

        self.model = self._load_model(model_cls, self.source, cfg)
        self.lora: LoraManager | None = None
        if args.enable_lora:
            self.lora = LoraManager(self.model, args.max_loras, args.max_lora_rank)
            for name, source in args.lora_sources().items():
                self.lora.load(name, source, resolve_lora_source(source))
        self._quantize()
        if self.cpu_path is not None:
            logger.info(
                "CPU path: class %s (torch %s), %s, quantization %s: %s%s",
                *(self.cpu_path.cpu_class, self.cpu_path.capability, self.cpu_path.dtype),
                self.cpu_path.quantization,
                self.cpu_path.reason,
                f"; {self.cpu_path.int4_kernel}" if self.cpu_path.int4_kernel else "",
            )
        self.vocab_size = cfg.vocab_size
        # every rank must hold the same slots: the smallest budget of all ranks wins
        self.max_total_tokens = parallel.all_reduce_min_cpu(self._kv_budget())
        self.pool = KVPool(
            cfg.num_hidden_layers,
            self.num_kv_heads,
            self.head_dim,
            self.max_total_tokens,
            self.dtype,
            self.device,
            head_major=self.backend.kv_head_major,
        )
        self.cuda_graphs = self._init_cuda_graphs()
        logger.info(
            "model %s loaded on rank %d/%d: %s%s on %s, %s attention, KV cache %d tokens",
            self.source.path,
            rank,
            self.tp_size,
            self.dtype,
            {"int4": " + int4 for small batches", "int8": " + int8 weights"}.get(
                self.quantization, ""
            ),
            self.device,
            self.backend_name,
            self.max_total_tokens,
        )

    def _load_model(self, model_cls: type, source: ModelSource, cfg):
        """The model built in its final dtype (no copy) with `source`'s weights."""
        max_pos = max(self.context_length, int(getattr(cfg, "max_position_embeddings", 0)))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_cls(cfg, self.backend, max_pos)
        finally:
            torch.set_default_dtype(default_dtype)
        model.load_weights(iter_weights(source, cfg))
        return model.eval()

    def _quantize(self) -> None:
        if self.quantization == "int4":
            self._quantize_int4()
        elif self.quantization == "int8":
            self._quantize_int8()

    def reload_weights(self, model_path: str) -> str:
        """Swap in the weights of `model_path`, a model of the same architecture (same
        shapes: the KV pool, the backend and the tokenizer stay). The new model is built
        beside the old one, so a file that fails to load leaves the old weights serving;
        the caller makes sure no request runs meanwhile."""
        if self.tp_size > 1:
            raise ValueError("updating weights is not supported with tensor parallelism")
        if self.lora is not None:
            raise ValueError(
                "updating weights is not supported with --enable-lora: the adapters are "
                "attached to the loaded model"
            )
        source = resolve_model(model_path)
        cfg = load_config(source)
        for key in _SAME_ARCHITECTURE:
            old, new = getattr(self.config, key, None), getattr(cfg, key, None)
            if old != new:
                raise ValueError(f"not the same architecture: {key} is {new}, the model has {old}")
        old_model = self.model
        try:
            self.model = self._load_model(model_class(cfg), source, cfg)
            self._quantize()
        except Exception:
            self.model = old_model
            raise
        self.source, self.config = source, cfg
        self.cuda_graphs = self._init_cuda_graphs()  # graphs captured the old parameters
        logger.info("weights reloaded from %s", source.path)
        return source.path

    def _attention_backend(self, model_cls: type):
        """The backend asked for, except that a model whose attention needs a sliding window
        or sinks takes the torch backend (FlashInfer's wrappers here take none of
        them yet); asking for FlashInfer explicitly then is refused with the reason."""
        name = self.args.attention_backend
        extras = getattr(model_cls, "attention_extras", lambda cfg: "")(self.config)
        if extras and name == "auto":
            name = "torch"
        backend = create_attention_backend(name, self.device, self.num_heads, self.dtype)
        if extras and not backend.supports_window_and_sinks:
            raise ValueError(
                f"this model's attention needs {extras}, which the {name} attention backend "
                "does not run: use --attention-backend torch (or auto)"
            )
        return backend

    def _quantize_int4(self) -> None:
        linears = [m for m in self.model.modules() if isinstance(m, LinearBase)]
        packed = sum(m.quantize_int4() for m in linears)
        if cpu_kernels.available()[0]:  # the norms and one stream's attention too
            for m in self.model.modules():
                if isinstance(m, RMSNorm):
                    m.cpu_kernel = True
            if self.backend_name == "torch":
                self.backend.cpu_kernel = True
            why = cpu_decode.why_not(self.model)
            if why is None:
                self.model.fused_decode = cpu_decode.FusedDecode(self.model)
            step = (
                f"every layer in one call of radixserve's kernels (1-{cpu_decode.max_rows()} rows)"
                if why is None
                else f"layer by layer ({why})"
            )
            logger.info("decode steps: %s", step)
            if self.cpu_path is not None:
                self.cpu_path = dataclasses.replace(self.cpu_path, decode_step=step)
        # the tied embedding is the head when the model has no lm_head of its own
        head = getattr(self.model, "lm_head", self.model.embed_tokens)
        # radixserve's int4 head where its kernel serves every small batch (half the int8
        # copy's bytes; both are rescored in float32, so the greedy token stays exact)
        int4_head = head.quantize_int4() and cpu_kernels.max_rows() >= SMALL_BATCH_ROWS
        if not int4_head:
            head.quantize_int8()
        logger.info(
            "int4 weights for %d of %d linear layers, %s LM head",
            packed,
            len(linears),
            "int4" if int4_head else "int8",
        )

    def _quantize_int8(self) -> None:
        linears = [m for m in self.model.modules() if isinstance(m, LinearBase)]
        packed = sum(m.quantize_int8() for m in linears)
        getattr(self.model, "lm_head", self.model.embed_tokens).quantize_int8_dynamic()
        logger.info("int8 weights for %d of %d linear layers and the LM head", packed, len(linears))

    def _rank_device(self, device: str) -> str:
        """One GPU per rank on each node: local rank r uses cuda:r."""
        if not device.startswith("cuda") or self.tp_size == 1:
            return device
        local_ranks = self.tp_size // self.args.nnodes
        present = torch.cuda.device_count()
        if local_ranks > present:
            raise ValueError(
                f"--tp-size {self.tp_size} over {self.args.nnodes} node(s) needs "
                f"{local_ranks} GPUs per node, but this node has {present}"
            )
        local = self.rank % local_ranks
        torch.cuda.set_device(local)
        return f"cuda:{local}"

    def _init_cuda_graphs(self):
        """Decode graphs on CUDA unless disabled; they need FlashInfer's fixed-buffer
        planning (the torch backend's per-step tables change shape)."""
        if not self.device.startswith("cuda") or self.args.disable_cuda_graph:
            return None
        if self.backend_name != "flashinfer":
            logger.info("CUDA graphs need the flashinfer attention backend: decode runs eagerly")
            return None
        if not getattr(self.model, "supports_cuda_graphs", True):
            logger.info(
                "this model's layers cannot be captured in a CUDA graph: decode runs eagerly"
            )
            return None
        from radixserve.engine.cuda_graph_runner import CudaGraphRunner

        return CudaGraphRunner(self)

    def _kv_budget(self) -> int:
        per_token = KVPool.bytes_per_token(
            self.config.num_hidden_layers, self.num_kv_heads, self.head_dim, self.dtype
        )
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        if self.device.startswith("cuda"):
            # measured after the weights are in; blocks torch cached but no longer uses
            # (loading temporaries) go back first so they count as free
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            used_by_others = total - free
            budget = total * self.args.mem_fraction_static - used_by_others
            tokens = int(budget // per_token)
            if tokens < 16:
                raise RuntimeError(
                    "no GPU memory left for the KV cache: raise --mem-fraction-static"
                )
            return tokens
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        fits = int(available * _CPU_KV_MEMORY_FRACTION // per_token)
        wanted = self.context_length * self.args.max_running_requests
        capped = min(wanted, _CPU_KV_BYTES_CAP // per_token, fits)
        return max(capped, min(self.context_length, fits))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for the rows `logit_rows` of the step's flat token list."""
        if self.tp_size == 1:
            return self._forward(batch, logit_rows)
        self._send_batch(batch, logit_rows)
        try:
            return self._forward(batch, logit_rows)
        except (torch.OutOfMemoryError, MemoryError) as e:
            # the other ranks may be inside a collective of this step: a retry with a new
            # batch would pair mismatched collectives, so this is fatal, not retryable
            raise RuntimeError(f"tensor-parallel step ran out of memory: {e}") from e

    @contextlib.contextmanager
    def _step_threads(self, batch: ForwardBatch) -> Iterator[None]:
        """One torch thread for the layers of a CPU step of at most
        --cpu-single-thread-tokens tokens. They are ~1,000 small operations; the few big
        enough to go parallel gain less from a second thread than waking it costs (the
        engine's threads sleep after a short spin, prepare_engine_env), and that thread
        competes with the HTTP process and the client. The LM head after them, one
        memory-bound matmul of several milliseconds, keeps every thread. Measured on 2
        cores in docs/engine.md ("One thread for a single stream"). A model whose decode
        steps run as one call (layers/cpu_decode.py) keeps every thread: there one parallel
        region spans the step, and its threads never sleep between operations."""
        threads = torch.get_num_threads()
        if (
            self.device != "cpu"
            or threads == 1
            or getattr(self.model, "fused_decode", None) is not None
            or batch.input_ids.numel() > self.args.cpu_single_thread_tokens
        ):
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _forward(self, batch: ForwardBatch, logit_rows: torch.Tensor) -> torch.Tensor:
        graphs = self.cuda_graphs
        if graphs is not None and graphs.can_run(batch) and logit_rows.numel() == batch.batch_size:
            return graphs.replay(batch)  # a decode step: one logits row per request, in order
        self.backend.init_forward(batch)
        if batch.lora_slots is not None:
            batch.metadata["lora"] = self.lora.batch_plan(
                batch.lora_slots, batch.extend_lens, self.device
            )
        with self._step_threads(batch):
            hidden = self.model(batch)
        # the LM head is one big memory-bound matmul: every thread reads its share
        return self.model.compute_logits(hidden[logit_rows])

    # ---- tensor parallelism: rank 0's side --------------------------------------------------
    def _send_batch(self, batch: ForwardBatch, logit_rows: torch.Tensor) -> None:
        """Three broadcasts: sizes, then the per-token tensors on the model's device (no
        host sync on a GPU), then the per-request lengths and slots, which live on the CPU."""
        slots = torch.cat(batch.req_slots)
        header = [
            _STEP,
            batch.input_ids.numel(),
            batch.batch_size,
            batch.num_prefill_reqs,
            batch.num_prefill_tokens,
            logit_rows.numel(),
            slots.numel(),
        ]
        parallel.broadcast_cpu(torch.tensor(header, dtype=torch.int64))
        per_token = torch.cat([batch.input_ids, batch.positions, batch.out_cache_loc, logit_rows])
        parallel.broadcast(per_token)
        lens = torch.tensor(batch.prefix_lens + batch.extend_lens, dtype=torch.int64)
        parallel.broadcast_cpu(torch.cat([lens, slots.to(torch.int64)]))

    def heartbeat(self) -> None:
        """Called by rank 0 when idle, so the other ranks' waits never reach the timeout."""
        if self.tp_size > 1:
            parallel.broadcast_cpu(self._header(_IDLE))

    def shutdown(self) -> None:
        """Rank 0: release the other ranks from `worker_loop`, then leave the group."""
        if self.tp_size > 1:
            parallel.broadcast_cpu(self._header(_STOP))
        parallel.destroy_tensor_parallel()

    @staticmethod
    def _header(kind: int) -> torch.Tensor:
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        header[0] = kind
        return header

    # ---- tensor parallelism: the other ranks -------------------------------------------------
    @torch.inference_mode()
    def worker_loop(self) -> None:
        """Run every step rank 0 broadcasts until it says stop; a dead peer raises."""
        while True:
            header = parallel.broadcast_cpu(self._header(_IDLE)).tolist()
            kind, tokens, reqs, prefill_reqs, prefill_tokens, rows, num_slots = header
            if kind == _STOP:
                parallel.destroy_tensor_parallel()
                return
            if kind == _IDLE:
                continue
            per_token = parallel.broadcast(
                torch.empty(3 * tokens + rows, dtype=torch.int64, device=self.device)
            )
            ids, pos, loc, logit_rows = per_token.split([tokens, tokens, tokens, rows])
            per_req = parallel.broadcast_cpu(torch.empty(2 * reqs + num_slots, dtype=torch.int64))
            prefix_lens = per_req[:reqs].tolist()
            extend_lens = per_req[reqs : 2 * reqs].tolist()
            seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
            batch = ForwardBatch(
                input_ids=ids,
                positions=pos,
                out_cache_loc=loc,
                kv_pool=self.pool,
                num_prefill_reqs=prefill_reqs,
                num_prefill_tokens=prefill_tokens,
                prefix_lens=prefix_lens,
                extend_lens=extend_lens,
                req_slots=list(per_req[2 * reqs :].split(seq_lens)),
            )
            self._forward(batch, logit_rows)
