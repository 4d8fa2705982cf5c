"""The API's one request validator, its admission tickets and its one rule for the engine
ids of a request's sequences, without a server."""

from __future__ import annotations

import pytest
from radixserve.api.admission import Admission
from radixserve.api.errors import APIError
from radixserve.api.validate import as_batch, check_prompt, check_token_ids, make_params
from radixserve.config import ServerArgs
from radixserve.engine.client import owned_by, sequence_rids
from radixserve.engine.io_struct import EngineReady


def _info(is_embedding: bool = False) -> EngineReady:
    return EngineReady(
        "m", 8, 100, 64, 4, "float32", "cpu", "torch", [0], is_embedding=is_embedding
    )


def _error(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **kwargs)
    assert e.value.status == 400
    return e.value


def test_sequence_ids_follow_one_rule_and_owned_by_undoes_it() -> None:
    assert sequence_rids("r", 1, 1) == ["r"]
    assert sequence_rids("r", 1, 2) == ["r-0", "r-1"]
    assert sequence_rids("r", 2, 1) == ["r-p0", "r-p1"]
    assert sequence_rids("r", 2, 2) == ["r-p0-0", "r-p0-1", "r-p1-0", "r-p1-1"]
    assert all(owned_by(x, "r") for x in sequence_rids("r", 2, 2))
    assert not owned_by("rr-0", "r") and not owned_by("r", "r-0")


def test_prompt_checks_name_the_field_and_where() -> None:
    info = _info()
    assert _error(check_prompt, info, [], "prompt").message == "prompt: the prompt is empty"
    err = _error(check_prompt, info, [1, 100], "input", where="input[2]")
    assert (err.param, err.message) == (
        "input",
        "input[2]: token id 100 is outside the vocabulary (size 100)",
    )
    assert _error(check_token_ids, [-1], 100, "tokens").param == "tokens"
    # a generation needs room for one token; an embedding may fill the context
    assert "but the prompt has 8 tokens" in _error(check_prompt, info, [1] * 8, "p").message
    check_prompt(_info(is_embedding=True), [1] * 8, "input")
    err = _error(check_prompt, info, [1] * 4, "p", max_tokens=5, max_param="max_tokens")
    assert err.param == "max_tokens" and "you requested 9 tokens" in err.message


def test_batches_and_params() -> None:
    assert as_batch("a", "prompt") == (["a"], True)
    assert as_batch([1, 2], "prompt") == ([[1, 2]], True)
    assert as_batch([[1], [2]], "prompt") == ([[1], [2]], False)
    assert _error(as_batch, [], "text").message == "text: must not be empty"
    err = _error(make_params, {"max_new_tokens": 1, "min_new_tokens": 2}, _info(), True)
    assert err.param == "min_tokens" and err.message.startswith("min_tokens:")
    assert _error(make_params, {"stop_token_ids": [100]}, _info(), False).param == (
        "stop_token_ids"
    )


def test_admission_registers_every_sequence_once() -> None:
    adm = Admission(ServerArgs(max_queued_requests=1))
    tickets = adm.admit("r", [3, 4], 2, running=4)
    assert sorted(adm.tickets) == ["r-p0-0", "r-p0-1", "r-p1-0", "r-p1-1"]
    assert (adm.open_sequences, adm.queued_tokens) == (4, 14)
    for rid in ("r", "r-p0-1"):  # the id itself, or a sequence of it, is taken
        assert _error(adm.admit, rid, [1], 1, running=4).param == "rid"
    with pytest.raises(APIError) as e:  # 4 open + 2 new - 4 running > 1 may wait
        adm.admit("s", [1, 1], 1, running=4)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    assert adm.running("r") == []
    tickets[0].started()
    tickets[0].started()
    assert adm.running("r") == ["r-p0-0"] and adm.queued_tokens == 11
    for t in tickets:
        t.free()
        t.free()
    assert (adm.open_sequences, adm.queued_tokens, adm.tickets) == (0, 0, {})
