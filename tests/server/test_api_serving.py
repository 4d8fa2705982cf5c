"""The one pass every generation route makes, without an engine: a Formatter's events framed
as SSE (opening, per update, closing, [DONE]); a failure after the 200 as a last error event;
and the stream's sequences closed however it ends."""

from __future__ import annotations

import asyncio
import json

from radixserve.api.serving import Formatter, Sequences, stream_events
from radixserve.engine.client import EngineError, GenerateChunk


def _chunk(index: int, delta: str) -> GenerateChunk:
    return GenerateChunk("r", delta, delta, [], [], 1, 1, 0, None, index=index)


class _Echo(Formatter):
    def opening(self, seqs: Sequences) -> list[dict]:
        return [{"open": seqs.rid}]

    def event(self, seqs: Sequences, chunk: GenerateChunk) -> dict | None:
        return {"i": chunk.index, "d": chunk.delta} if chunk.delta else None

    def closing(self, seqs: Sequences) -> list[dict]:
        return [{"close": seqs.n}]


def _run(streams) -> tuple[list, list[bool]]:
    closed = []

    def tracked(items):
        async def gen():
            try:
                for item in items:
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                closed.append(True)

        return gen()

    async def main() -> list[str]:
        seqs = Sequences("r", [tracked(s) for s in streams], n=len(streams))
        return [e async for e in stream_events(seqs, _Echo())]

    events = asyncio.run(main())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e[6:]) for e in events[:-1]], closed


def test_events_in_order_and_updates_with_nothing_skipped() -> None:
    events, closed = _run([[_chunk(0, "a"), _chunk(0, ""), _chunk(0, "b")]])
    assert events == [{"open": "r"}, {"i": 0, "d": "a"}, {"i": 0, "d": "b"}, {"close": 1}]
    assert closed == [True]


def test_a_failure_after_the_200_is_the_last_event() -> None:
    events, closed = _run([[_chunk(0, "a"), EngineError("gone")], [_chunk(1, "x")]])
    assert events[0] == {"open": "r"}
    assert events[-1]["error"]["code"] == "engine_error"
    assert "gone" in events[-1]["error"]["message"]
    assert {"close": 2} not in events
    assert closed == [True, True]
