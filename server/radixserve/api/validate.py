"""One validator for what a request asks of the engine: its text, its prompts' token ids
(empty, vocabulary, context length), how many sequences it starts, and its sampling
parameters. Each failure is a 400 naming the field; the engine checks ids again only as a
backstop, so a bad request never reaches it from here.
"""

from __future__ import annotations

from typing import Any

from radixserve.api.errors import APIError, bad_request, from_value_error
from radixserve.engine.io_struct import EngineReady
from radixserve.engine.sampling_params import SamplingParams, outside_vocab

# the most sequences (prompts x n) one request may start: bounds the work one body can queue
MAX_SEQUENCES = 2048
# the engine's names -> the OpenAI request's names, for error messages
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def check_text(text: str, param: str) -> str:
    """400 for a string that is not Unicode text: JSON's "\\ud800" escape decodes to a lone
    surrogate, which the tokenizer would refuse with a TypeError (a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(
            f"{param}: not valid Unicode (a lone surrogate at character {e.start})", param
        ) from e
    return text


def as_batch(value: Any, param: str) -> tuple[list, bool]:
    """A request's prompt or prompts as a list, and whether it was one: a string or a list
    of token ids is one prompt; an empty list is a 400."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value], True
    if not value:
        raise bad_request(f"{param}: must not be empty", param)
    return list(value), False


def check_batch(num_prompts: int, n: int, param: str) -> None:
    """400 for a request that would start more sequences than MAX_SEQUENCES."""
    if num_prompts * n > MAX_SEQUENCES:
        name = param if num_prompts > MAX_SEQUENCES else "n"  # n=1 would not fit either
        raise bad_request(
            f"{name}: {num_prompts} prompt(s) x n={n} is more than the {MAX_SEQUENCES} "
            "sequences one request may start",
            name,
        )


def check_token_ids(ids: list[int], vocab_size: int, param: str, where: str | None = None):
    """400 for an id outside the vocabulary; `where` locates it (input[3]) within `param`."""
    bad = outside_vocab(ids, vocab_size)
    if bad is not None:
        raise bad_request(
            f"{where or param}: token id {bad} is outside the vocabulary (size {vocab_size})",
            param,
        )


def check_prompt(
    info: EngineReady,
    ids: list[int],
    param: str,
    *,
    where: str | None = None,
    max_tokens: int | None = None,
    max_param: str = "max_tokens",
) -> None:
    """400 for an empty prompt, ids outside the vocabulary, or a request beyond the context:
    an embedding may fill the context, a generation needs room for its first token and,
    when it asks for them, all of its `max_tokens`."""
    if not ids:
        raise bad_request(f"{where or param}: the prompt is empty", param)
    check_token_ids(ids, info.vocab_size, param, where)
    ctx, room = info.context_length, 0 if info.is_embedding else 1
    if len(ids) + room > ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens, but the prompt has "
            f"{len(ids)} tokens.",
            param,
        )
    if max_tokens is not None and len(ids) + max_tokens > ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the prompt or {max_param}.",
            max_param,
        )


def make_params(fields: dict[str, Any], info: EngineReady, openai_names: bool) -> SamplingParams:
    """SamplingParams from request fields (None = default); ValueError -> 400 naming the field."""
    try:
        params = SamplingParams.from_dict({k: v for k, v in fields.items() if v is not None})
        params.verify(info.vocab_size)
    except (ValueError, TypeError) as e:
        err: APIError = from_value_error(ValueError(str(e)))
        if openai_names and err.param in _OPENAI_NAMES:
            name = _OPENAI_NAMES[err.param]
            err.message = err.message.replace(err.param, name, 1)
            err.param = name
        raise err from e
    return params
