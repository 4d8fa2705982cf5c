"""`priority` and `cache_salt` over HTTP (vLLM's fields) on every generation route.

Priorities: lower is more urgent; a server started without --enable-priority-scheduling
refuses any other value than 0. With it and a full queue, an urgent request displaces the
least urgent waiting one (503 + Retry-After), never a running one.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from api_harness import DEFAULT_FLAGS, error_of, metrics, start_server, wait_idle

LONG_PREFIX = "You are a careful assistant who answers briefly. " * 20


def completion(url: str, **body) -> httpx.Response:
    body = {"max_tokens": 4, "temperature": 0, **body}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def test_priority_needs_the_flag_on_every_route(api_server):
    url = api_server.url
    refused = [
        completion(url, prompt="Hi", priority=3),
        httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "priority": -1},
        ),
        httpx.post(url + "/generate", json={"text": "Hi", "priority": 1}),
    ]
    for r in refused:
        assert r.status_code == 400, r.text
        assert "--enable-priority-scheduling" in r.text
    assert error_of(refused[0])["param"] == "priority"
    assert completion(url, prompt="Hi", priority=0).status_code == 200


def test_cache_salt_isolates_cached_prefixes(api_server):
    url = api_server.url
    prompt = LONG_PREFIX + "Name a planet."

    def cached(salt: str | None) -> tuple[int, int, str]:
        body = {"prompt": prompt} if salt is None else {"prompt": prompt, "cache_salt": salt}
        r = completion(url, **body)
        assert r.status_code == 200, r.text
        usage, text = r.json()["usage"], r.json()["choices"][0]["text"]
        return (
            (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            usage["prompt_tokens"],
            text,
        )

    wait_idle(api_server)
    _, n, text = cached(f"salt-one-{time.time()}")
    salt = f"salt-two-{time.time()}"
    assert cached(salt)[0] == 0  # a new salt reads nothing another salt cached
    assert cached(None)[0] == 0  # nor does an unsalted request
    again, _, text2 = cached(salt)
    assert again == n - 1  # the same salt shares the whole prompt but its last token
    assert text2 == text  # and the answer does not depend on where the KV came from
    r = completion(url, prompt="x", cache_salt="")
    assert r.status_code == 400 and error_of(r)["param"] == "cache_salt"


@pytest.fixture(scope="module")
def prio_server():
    server = start_server(
        *DEFAULT_FLAGS,
        "--enable-priority-scheduling",
        "--max-running-requests", "1",
        "--max-queued-requests", "2",
    )  # fmt: skip
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def _open_sequences(server) -> float:
    return metrics(server)[("radixserve_open_sequences", ())]


def test_urgent_request_goes_first_and_displaces_the_least_urgent_waiting(prio_server):
    """One request runs; two low-priority ones fill the queue; an urgent one arrives: the
    newest low one is answered 503 at once, the urgent one starts before the older low one,
    and the running request loses nothing."""
    url = prio_server.url
    wait_idle(prio_server)
    results: dict[str, object] = {}
    first_token: dict[str, float] = {}

    def stream(name: str, priority: int, max_tokens: int) -> None:
        # the one that will be displaced does not stream: a stream's headers are sent at
        # once, so a displaced stream ends with the same error as its last event instead
        body = {"prompt": f"Story {name}:", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": name != "low-new", "priority": priority, "temperature": 0}  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200 or name == "low-new":
                r.read()
                results[name] = r
                return
            text = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    first_token.setdefault(name, time.monotonic())
                    text.append(line)
            results[name] = text

    def start(name: str, priority: int, max_tokens: int, open_after: int) -> threading.Thread:
        t = threading.Thread(target=stream, args=(name, priority, max_tokens))
        t.start()
        deadline = time.monotonic() + 60
        while _open_sequences(prio_server) < open_after and name not in results:
            assert time.monotonic() < deadline, f"{name} never got in"
            time.sleep(0.02)
        return t

    threads = [start("running", 5, 200, 1)]
    while "running" not in first_token:
        time.sleep(0.02)
    threads.append(start("low-old", 5, 4, 2))
    threads.append(start("low-new", 5, 4, 3))
    threads.append(start("urgent", 0, 4, 3))
    for t in threads:
        t.join(300)

    displaced = results["low-new"]
    assert isinstance(displaced, httpx.Response) and displaced.status_code == 503
    assert displaced.headers.get("retry-after") == "1"
    assert displaced.json()["error"]["code"] == "server_overloaded"
    events = [json.loads(line[len("data: ") :]) for line in results["running"]]
    assert not any("error" in e for e in events)  # the running request lost nothing
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert first_token["urgent"] < first_token["low-old"]
    wait_idle(prio_server)


def test_responses_and_messages_take_priority_and_cache_salt(api_server):
    """The other generation routes carry the same fields (through the chat path): a
    priority without the flag is refused there too, an empty salt is a 400."""
    url = api_server.url
    r = httpx.post(url + "/v1/responses", json={"input": "Hi", "priority": 2})
    assert r.status_code == 400 and "--enable-priority-scheduling" in r.text
    msg = {"model": "x", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    models = httpx.get(url + "/v1/models").json()["data"]
    msg["model"] = models[0]["id"]
    r = httpx.post(url + "/v1/messages", json={**msg, "priority": 2})
    assert r.status_code == 400 and "--enable-priority-scheduling" in r.text
    r = httpx.post(url + "/v1/messages", json={**msg, "cache_salt": "tenant-a"})
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/responses", json={"input": "Hi", "cache_salt": ""})
    assert r.status_code == 400
