"""The assistant's output as ordered segments: runs of reasoning and of text, then tool
calls. Responses (output items) and Messages (content blocks) are both this list, streamed
or whole; the chat path's StreamView turns model text into it, and each API only names the
pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.api.openai.chat import StreamView, ToolMode
from radixserve.api.tools import ToolCall


@dataclass
class Open:
    kind: str  # "reasoning" or "text"
    index: int


@dataclass
class Delta:
    kind: str
    index: int
    text: str


@dataclass
class Close:
    """A segment ends; `text` is all of it."""

    kind: str
    index: int
    text: str


@dataclass
class Call:
    """A whole tool call: calls are known only once the output is finished."""

    index: int
    call: ToolCall


Op = Open | Delta | Close | Call


class Segments:
    """Feed a sequence's cumulative text; get the segment operations since the last feed.
    A finished output with nothing in it still has one (empty) text segment, so every
    answer has a message."""

    def __init__(self, mode: ToolMode) -> None:
        self.view = StreamView(mode)
        self.current: Close | None = None  # the open segment and its text so far
        self.count = 0

    def advance(self, text: str, finished: bool) -> list[Op]:
        d_reason, d_content, calls = self.view.step(text, finished)
        ops: list[Op] = []
        for kind, delta in (("reasoning", d_reason), ("text", d_content)):
            if delta:
                ops += self._write(kind, delta)
        if finished:
            if self.count == 0 and not calls:
                ops += self._write("text", "")
            ops += self._close()
            for call in calls:
                ops.append(Call(self.count, call))
                self.count += 1
        return ops

    def _write(self, kind: str, delta: str) -> list[Op]:
        ops: list[Op] = []
        if self.current is None or self.current.kind != kind:
            ops += self._close()
            self.current = Close(kind, self.count, "")
            self.count += 1
            ops.append(Open(kind, self.current.index))
        self.current.text += delta
        if delta:
            ops.append(Delta(kind, self.current.index, delta))
        return ops

    def _close(self) -> list[Op]:
        done, self.current = self.current, None
        return [done] if done is not None else []


def whole(mode: ToolMode, text: str) -> list[Close | Call]:
    """The segments of a finished output, for a response that is not streamed."""
    return [op for op in Segments(mode).advance(text, True) if isinstance(op, Close | Call)]
