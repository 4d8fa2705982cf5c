"""Per-request sampling settings, checked once on the way in (SGLang's names)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

_MAX_STOP_STRINGS = 16
_MAX_STOP_LENGTH = 1024  # the engine re-decodes this much of the output tail every step
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    # constrained decoding, at most one of them (engine/grammar.py)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> SamplingParams:
        """Build from a request's dict; unknown keys are an error, not silently ignored."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {', '.join(unknown)}")
        d = {k: v for k, v in d.items() if v is not None}
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        if "logit_bias" in d:
            try:
                d["logit_bias"] = {int(k): float(v) for k, v in d["logit_bias"].items()}
            except (AttributeError, TypeError, ValueError) as e:
                raise ValueError("logit_bias: expected a map of token id to bias") from e
        p = cls(**d)
        p.verify()
        return p

    def verify(self, vocab_size: int | None = None) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}: {why}")

        for name in (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                bad(name, f"must be a finite number, got {v!r}")
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, f"must be an integer, got {v!r}")
            if not _INT64_MIN <= v <= _INT64_MAX:  # else the engine's tensors overflow
                bad(name, f"{v} is out of range")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", "must be between 0 and max_new_tokens")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            bad("top_k", "must be -1 (off) or >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            bad("repetition_penalty", "must be in (0, 2]")
        if not 1 <= self.n <= 128:
            bad("n", "must be between 1 and 128")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            bad("seed", "must be an integer")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", "out of range")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > _MAX_STOP_STRINGS:
            bad("stop", f"at most {_MAX_STOP_STRINGS} stop strings")
        if any(len(s) > _MAX_STOP_LENGTH for s in self.stop):
            bad("stop", f"each stop string has at most {_MAX_STOP_LENGTH} characters")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _INT64_MAX
            for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "must be a list of non-negative token ids")
        for tok, bias in self.logit_bias.items():
            if not 0 <= tok <= _INT64_MAX:
                bad("logit_bias", f"token id {tok} is out of range")
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                bad("logit_bias", f"bias for token {tok} must be in [-100, 100]")
        given = [k for k in ("json_schema", "regex", "ebnf") if getattr(self, k) is not None]
        if len(given) > 1:
            bad(
                given[1],
                f"only one of json_schema, regex and ebnf per request, got {', '.join(given)}",
            )
        for k in given:
            if not isinstance(getattr(self, k), str):
                bad(k, "must be a string")
        if vocab_size is not None:
            for name, ids in (
                ("stop_token_ids", self.stop_token_ids),
                ("logit_bias", list(self.logit_bias)),
            ):
                if (t := outside_vocab(ids, vocab_size)) is not None:
                    bad(name, f"token id {t} is outside the vocabulary (size {vocab_size})")

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, text) of the request's grammar, if it has one."""
        for kind in ("json_schema", "regex", "ebnf"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0
            or self.presence_penalty != 0
            or self.repetition_penalty != 1
        )


def outside_vocab(ids: Iterable[int], vocab_size: int) -> int | None:
    """The first id that is no token of a vocabulary of `vocab_size`, or None: the one
    vocabulary rule for prompts, stop tokens and logit biases."""
    return next((t for t in ids if not 0 <= t < vocab_size), None)
