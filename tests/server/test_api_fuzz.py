"""Fuzzing: schemathesis sends cases generated from the server's own /openapi.json (valid and
invalid ones), hypothesis sends random sampling parameters; every answer is below 500 and in
time, and the server is healthy and correct afterwards. Plus a property of SamplingParams
that keeps the engine alive: whatever it accepts fits the engine's tensors.

The runs are derandomized (the same cases every run) and bounded: generation requests get
at most a few tokens and a `timeout`, so the module takes well under a minute.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import schemathesis
from api_harness import Server, wait_idle
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from radixserve.engine.sampling_params import SamplingParams
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow
CALL_TIMEOUT = 60  # an answer slower than this counts as a hang
MAX_TOKENS = 4
CASE_TIMEOUT = 10  # seconds: the `timeout` every generation case gets at most
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
# their token limit has its own name: capped like max_tokens
OTHER_LIMITS = {"/v1/responses": "max_output_tokens", "/v1/messages": "max_tokens"}
# routes with effects on the whole server (a profiler left running, a weights swap): tested
# on their own in test_api_control.py, not fed random cases
NOT_FUZZED = {
    "GET /start_profile",
    "POST /start_profile",
    "GET /stop_profile",
    "POST /stop_profile",
    "POST /update_weights_from_disk",
}
INT64 = 2**63


def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


def bound(path: str, body) -> None:
    """Keep generation cheap without making a case valid or invalid: a few tokens at most
    (also where the route's default is longer), two choices, a timeout of at most
    CASE_TIMEOUT, and the served model (a random `model` is a 404 that never generates)."""
    if path in OTHER_LIMITS and isinstance(body, dict):
        body.pop("model", None)
        _cap(body, OTHER_LIMITS[path], MAX_TOKENS, default=MAX_TOKENS)
        return
    if path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    body.pop("model", None)
    _cap(body, "timeout", CASE_TIMEOUT, default=CASE_TIMEOUT)
    _cap(body, "n", 2)
    if path == "/generate":
        sp = body.setdefault("sampling_params", {})
        for d in sp if isinstance(sp, list) else [sp]:
            if isinstance(d, dict):
                _cap(d, "max_new_tokens", MAX_TOKENS, default=MAX_TOKENS)
                _cap(d, "n", 2)
    else:
        _cap(body, "max_completion_tokens", MAX_TOKENS)
        _cap(body, "max_tokens", MAX_TOKENS, default=MAX_TOKENS)


def _cap(d: dict, key: str, cap: float, default: float | None = None) -> None:
    v = d.get(key)
    if v is None and default is not None and key not in d:
        d[key] = default
    elif isinstance(v, int | float) and not isinstance(v, bool) and v > cap:
        d[key] = cap


def assert_healthy_and_correct(server: Server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    wait_idle(server)
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=CALL_TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " Paris.\n\n"


def test_schemathesis_openapi_no_5xx(api_server):
    schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/chat/completions", "POST /generate"} <= {op.label for op in operations}
    seen: dict[str, list[int]] = {}
    for op in operations:
        if op.label in NOT_FUZZED:
            continue
        strategies = [
            op.as_strategy(generation_mode=GenerationMode.POSITIVE),
            op.as_strategy(generation_mode=GenerationMode.NEGATIVE),
            *schema.get_strategies_from_examples(op),  # the routes' own examples, varied
        ]
        fuzz_operation(op, st.one_of(strategies), api_server.url, seen.setdefault(op.label, []))
    # the fuzzing reached the engine, not only the validators
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /generate"):
        assert 200 in seen[label] and 400 in seen[label], (label, seen[label])
    assert_healthy_and_correct(api_server)


def fuzz_operation(op, cases, url: str, statuses: list[int]) -> None:
    """Cases of one operation: each answered below 500, errors in OpenAI's shape."""

    @fuzz_settings(25)
    @given(case=cases)
    def check(case):
        bound(op.path, case.body)
        response = case.call(base_url=url, timeout=CALL_TIMEOUT)
        statuses.append(response.status_code)
        assert response.status_code < 500, (op.label, case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"], response.text

    check()


_HUGE = [2**63, 2**64 + 1, 10**30, -(2**63) - 1]
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(_HUGE),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3, max_value=3),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 2**66), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.floats(allow_nan=True), max_size=2),
)
_SAMPLING_KEYS = sorted(
    [
        "max_new_tokens",
        "min_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "n",
        "seed",
        "logit_bias",
        "skip_special_tokens",
    ]
)
_sampling_dicts = st.dictionaries(st.sampled_from(_SAMPLING_KEYS), _ANY, max_size=3)


@fuzz_settings(300)
@given(d=_sampling_dicts)
def test_sampling_params_accept_only_what_the_engine_can_hold(d):
    """Accepted parameters are finite, in int64, of the right types: a value that passes
    here cannot overflow a tensor in the engine and kill it for every other request."""
    try:
        p = SamplingParams.from_dict(d)
        p.verify(vocab_size=49152)
    except ValueError as e:
        field = str(e).split(":")[0]
        assert field in d or field == "sampling_params", (d, str(e))
        return
    for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
        v = getattr(p, name)
        assert type(v) is int and -INT64 <= v < INT64, (name, v)
    for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty"):
        v = getattr(p, name)
        assert not isinstance(v, bool) and math.isfinite(v), (name, v)
    for name in ("ignore_eos", "skip_special_tokens"):
        assert isinstance(getattr(p, name), bool), name
    assert all(type(t) is int and 0 <= t < 49152 for t in p.stop_token_ids)
    assert all(type(t) is int and 0 <= t < 49152 for t in p.logit_bias)
    assert all(isinstance(s, str) and s for s in p.stop)


def test_random_sampling_params_live(api_server):
    """/generate with random sampling parameters: a 200 within the token cap, or a 400 naming
    one of the fields sent; never a 5xx, and the engine keeps serving."""
    statuses = []

    # explicit examples run on every run, so both answers are always exercised: how many of
    # the generated dicts are valid varied between runs of the whole suite (2 of 25 once)
    @fuzz_settings(25)
    @given(d=_sampling_dicts)
    @example(d={})
    @example(d={"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 2})
    @example(d={"top_k": 3, "min_p": 0.1, "stop": ["x"]})
    @example(d={"temperature": -1.0})
    @example(d={"max_new_tokens": -5})
    @example(d={"top_k": "three"})
    def check(d):
        if isinstance(d.get("max_new_tokens"), int) and d["max_new_tokens"] > MAX_TOKENS:
            d["max_new_tokens"] = MAX_TOKENS
        if isinstance(d.get("n"), int) and d["n"] > 2:
            d["n"] = 2
        body = {"text": "Hello", "sampling_params": d, "timeout": 10}
        r = httpx.post(
            api_server.url + "/generate",
            content=json.dumps(body),  # json.dumps writes NaN and Infinity, as some clients do
            headers={"content-type": "application/json"},
            timeout=CALL_TIMEOUT,
        )
        statuses.append(r.status_code)
        assert r.status_code in (200, 400), (d, r.text[:300])
        if r.status_code == 400:
            param = r.json()["error"]["param"]
            assert param in d or param == "sampling_params", (d, r.text)

    check()
    assert statuses.count(200) >= 3 and statuses.count(400) >= 3, statuses
    assert_healthy_and_correct(api_server)
