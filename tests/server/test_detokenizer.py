"""Streaming never emits broken UTF-8: token by token equals decoding all at once."""

from __future__ import annotations

import pytest
from radixserve.engine.detokenizer import IncrementalDetokenizer
from radixserve.models.loader import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you?",
        "naïve café — 東京タワー 🚀🎉 ok",
        "  leading spaces\n\ttabs  ",
        "🤖" * 5,
    ],
)
def test_token_by_token_matches_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
