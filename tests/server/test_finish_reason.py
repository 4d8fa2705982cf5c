"""Finish reasons: each type writes SGLang's meta_info shape and OpenAI's fields in one place,
and survives the pickling that carries it across the engine's socket."""

from __future__ import annotations

import pickle

import pytest
from radixserve.engine.io_struct import FinishAbort, FinishLength, FinishStop


@pytest.mark.parametrize(
    ("reason", "json", "matched_stop"),
    [
        (FinishStop(7), {"type": "stop", "matched": 7}, 7),
        (FinishStop("\n\n"), {"type": "stop", "matched": "\n\n"}, "\n\n"),
        (FinishLength(), {"type": "length", "matched": None}, None),
        (FinishAbort("aborted"), {"type": "abort", "message": "aborted"}, None),
        (
            FinishAbort("bad grammar", status_code=400),
            {"type": "abort", "message": "bad grammar", "status_code": 400},
            None,
        ),
    ],
)
def test_wire_shapes(reason, json, matched_stop):
    assert reason.to_json() == json
    assert reason.type == json["type"]
    assert reason.matched_stop == matched_stop
    assert pickle.loads(pickle.dumps(reason)) == reason


def test_a_misspelt_field_is_an_error_not_none():
    with pytest.raises(AttributeError):
        FinishLength().message  # noqa: B018
