"""Tool calling and reasoning output: parsers from model text to OpenAI's fields.

- `required_tool_schema` turns `tool_choice="required"` or a named function into a JSON
  schema the grammar enforces, so the answer *is* the tool calls (vLLM's approach).
- Parsers for `tool_choice="auto"` read the model's own tool-call format, chosen by
  `--tool-call-parser`: `hermes` (Qwen 2.5/3 and Hermes templates:
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) and `llama3_json` (Llama 3.x:
  an optional `<|python_tag|>`, then `{"name": ..., "parameters": {...}}`, several joined
  by `;`).
- `ReasoningParser` splits `<think>...</think>` into `reasoning_content`.
Streaming parsers hold back text that may be the start of a marker, so no partial marker
ever reaches the client as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self, index: int | None = None) -> dict:
        d = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            d["index"] = index
        return d


def _function(tool: dict) -> dict:
    fn = tool.get("function", tool)
    return {
        "name": fn["name"],
        "parameters": fn.get("parameters") or {"type": "object", "properties": {}},
    }


def required_tool_schema(tools: list[dict], tool_choice, parallel: bool = True) -> dict:
    """The JSON schema of the answer when a tool call is required (or named)."""
    fns = [_function(t) for t in tools]
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        fns = [f for f in fns if f["name"] == name]
        if not fns:
            raise ValueError(f"tool_choice: function {name!r} is not among the tools")
    one = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "parameters": f["parameters"]},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for f in fns
        ]
    }
    schema = {"type": "array", "items": one, "minItems": 1}
    if not parallel or isinstance(tool_choice, dict):
        schema["maxItems"] = 1
    return schema


def calls_from_required(text: str) -> list[ToolCall]:
    """Tool calls from a grammar-constrained answer (see required_tool_schema)."""
    return [
        ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
        for c in json.loads(text)
    ]


class ToolParser:
    """Base: find tool calls in a finished text; stream content until a call starts."""

    start: str = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        raise NotImplementedError

    def stream_content(self, text: str, finished: bool) -> str:
        """The part of the accumulated text that is surely plain content."""
        i = text.find(self.start)
        if i >= 0:
            return text[:i]
        if finished:
            return text
        return text[: len(text) - _partial_suffix(text, self.start)]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _decode_call(obj: dict, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesToolParser(ToolParser):
    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        if self.start not in text:
            return text, []
        calls = []
        for body in self._block.findall(text):
            try:
                call = _decode_call(json.loads(body), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
        if not calls:
            return text, []
        content = text[: text.index(self.start)].strip()
        return content or None, calls


class Llama3JsonToolParser(ToolParser):
    start = "{"
    _tag = "<|python_tag|>"

    def parse(self, text):
        body = text.strip()
        if body.startswith(self._tag):
            body = body[len(self._tag) :]
        if not body.lstrip().startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        i = 0
        body = body.strip()
        while i < len(body):
            try:
                obj, end = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            call = _decode_call(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            i = end
            while i < len(body) and body[i] in " \n\t;":
                i += 1
        return None, calls

    def stream_content(self, text, finished):
        stripped = text.lstrip()
        if (
            stripped.startswith("{")
            or stripped.startswith(self._tag)
            or self._tag.startswith(stripped)
        ):
            return "" if not finished else (text if not self.parse(text)[1] else "")
        return text


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"--tool-call-parser: {name!r} is not one of {', '.join(TOOL_PARSERS)}"
        ) from None


class ReasoningParser:
    """`<think>reasoning</think>answer` → (reasoning, answer); also when the template already
    opened `<think>` in the prompt, so the output starts inside the reasoning."""

    def __init__(
        self, start: str = "<think>", end: str = "</think>", starts_inside: bool = False
    ) -> None:
        self.start, self.end, self.starts_inside = start, end, starts_inside

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        """(reasoning, content) of the accumulated text; while streaming, partial markers
        are held back from both."""
        body = text
        inside = self.starts_inside
        if body.lstrip().startswith(self.start):
            body = body.lstrip()[len(self.start) :]
            inside = True
        elif not inside:
            if not finished and self.start.startswith(body.lstrip()) and body.strip():
                return None, ""
            return None, body
        j = body.find(self.end)
        if j < 0:
            keep = len(body) if finished else len(body) - _partial_suffix(body, self.end)
            return body[:keep], ""
        return body[:j], body[j + len(self.end) :].lstrip("\n")


REASONING_PARSERS = {"deepseek-r1": dict(starts_inside=True), "qwen3": dict(), "think": dict()}


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return ReasoningParser(**REASONING_PARSERS[name])
    except KeyError:
        raise ValueError(
            f"--reasoning-parser: {name!r} is not one of {', '.join(REASONING_PARSERS)}"
        ) from None
