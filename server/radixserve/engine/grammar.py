"""Constrained decoding with xgrammar: JSON schema, regex and EBNF grammars.

Grammars compile on a worker thread (xgrammar's compiler runs in C++ without the GIL), so
the engine loop keeps stepping while a new schema compiles; compiled grammars are cached
by their kind and text. Each constrained request owns a GrammarMatcher that the sampler
asks for the allowed-token bitmask and the scheduler feeds each sampled token.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger(__name__)

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")


class GrammarError(ValueError):
    """The grammar does not compile: the request fails with a 400."""


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._cache: dict[tuple[str, str], Future] = {}

    def submit(self, kind: str, text: str) -> Future:
        key = (kind, text)
        fut = self._cache.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._pool.submit(self._compile, kind, text)
            self._cache[key] = fut
        return fut

    def _compile(self, kind: str, text: str):
        try:
            if kind == "json_schema":
                if text in ("", "{}", "object"):  # any JSON object (OpenAI's json_object)
                    text = '{"type": "object"}'
                json.loads(text)
                # compact JSON: with free whitespace a small model can pad forever
                return self.compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "ebnf":
                return self.compiler.compile_grammar(text)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subtypes
            raise GrammarError(f"{kind} does not compile: {e}") from e
        raise GrammarError(f"unknown grammar kind {kind!r}")

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_grammar_masks(logits, matchers: list) -> None:
    """Mask, in place, the tokens each constrained row's grammar forbids next."""
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
