"""Next-token agreement of a lossy path with float32: teacher-forced top-1 over ShareGPT text.

At every position of segments of natural text the lossy path's most likely next token is
compared with the exact path's (float32, no quantization). Two ways to run a path:
`runner_top1` runs each segment as one prefill (what a path that quantizes every batch size
changes), `runner_top1_decode` feeds the segments one token a step, all segments in one
decode batch, so the small-batch kernels a decode step uses (int4, the int8 head) are the
ones measured. The same token ids can be sent to llama.cpp's server one prefix at a time
(`llama_top1`), so its Q8-activation path over the same Q4 weights is measured the same way.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import torch

from radixserve.bench.datasets import load_sharegpt_pairs


def sharegpt_segments(tokenizer: Any, total_tokens: int, segment_len: int = 256) -> list[list[int]]:
    """Segments of `segment_len` tokens cut from the replies of complete ShareGPT records,
    in file order, until they hold `total_tokens` predictions."""
    segments: list[list[int]] = []
    predictions = 0
    for _, reply in load_sharegpt_pairs():
        ids = tokenizer.encode(reply, add_special_tokens=False)
        for start in range(0, len(ids) - segment_len + 1, segment_len):
            segments.append(ids[start : start + segment_len])
            predictions += segment_len - 1
            if predictions >= total_tokens:
                return segments
    raise ValueError(f"the ShareGPT sample holds fewer than {total_tokens} tokens of replies")


@torch.inference_mode()
def runner_top1(runner: Any, segments: list[list[int]]) -> list[list[int]]:
    """The runner's top-1 next token after each prefix of each segment (all but the last)."""
    from radixserve.layers.attention import ForwardBatch

    out = []
    for ids in segments:
        slots = runner.pool.alloc(len(ids))
        batch = ForwardBatch(
            input_ids=torch.tensor(ids),
            positions=torch.arange(len(ids)),
            out_cache_loc=slots,
            kv_pool=runner.pool,
            num_prefill_reqs=1,
            num_prefill_tokens=len(ids),
            prefix_lens=[0],
            extend_lens=[len(ids)],
            req_slots=[slots],
        )
        try:
            logits = runner.forward(batch, torch.arange(len(ids) - 1))
        finally:
            runner.pool.free(slots)
        out.append(logits.argmax(-1).tolist())
    return out


@torch.inference_mode()
def runner_top1_decode(runner: Any, segments: list[list[int]]) -> list[list[int]]:
    """Like `runner_top1`, but as decode steps: step t feeds token t of every segment at
    once (batch = number of segments), after the KV of tokens 0..t-1 written by earlier steps."""
    from radixserve.layers.attention import ForwardBatch

    length = len(segments[0])
    if any(len(ids) != length for ids in segments):
        raise ValueError("decode teacher forcing needs segments of one length")
    slots = [runner.pool.alloc(length) for _ in segments]
    rows = torch.arange(len(segments))
    tokens = torch.tensor(segments)
    top1: list[list[int]] = [[] for _ in segments]
    try:
        for t in range(length - 1):
            batch = ForwardBatch(
                input_ids=tokens[:, t].contiguous(),
                positions=torch.full((len(segments),), t),
                out_cache_loc=torch.stack([s[t] for s in slots]),
                kv_pool=runner.pool,
                num_prefill_reqs=0,
                num_prefill_tokens=0,
                prefix_lens=[t] * len(segments),
                extend_lens=[1] * len(segments),
                req_slots=[s[: t + 1] for s in slots],
            )
            for row, token in zip(
                top1, runner.forward(batch, rows).argmax(-1).tolist(), strict=True
            ):
                row.append(token)
    finally:
        for s in slots:
            runner.pool.free(s)
    return top1


def llama_top1(base_url: str, segments: list[list[int]]) -> list[list[int]]:
    """llama-server's greedy next token after each prefix; its prompt cache makes each call
    one new token of work."""
    out = []
    for ids in segments:
        row = []
        for end in range(1, len(ids)):
            body = {
                "prompt": ids[:end],
                "n_predict": 1,
                "temperature": 0.0,
                "top_k": 1,
                "cache_prompt": True,
                "return_tokens": True,
            }
            req = urllib.request.Request(
                f"{base_url}/completion",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=120) as resp:
                reply = json.loads(resp.read())
            row.append(int(reply["tokens"][0]))
        out.append(row)
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


# The agreement of llama.cpp's llama-server with float32 on the default model (its Q8
# activations against the same Q4_1 weights), measured by bench/quality.py as above: the
# bar a lossy path must reach before `auto` may pick it (issue 12). Measured on a Zen 3
# (AVX2) and again, to the same figure, by llama.cpp's AVX2 and native (AVX-512, AMX)
# builds on a Xeon: bench/results/quality-2026-12-02.md, quality-2026-12-03-*.md.
LLAMA_CPP_TOP1_AGREEMENT = 0.9711

# The fixed prompt set whose greedy answers docs/engine.md reports for each path; the first
# is the README's example.
FIXED_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Give me a short tip for writing clean Python code.",
    "Who wrote the play Romeo and Juliet?",
]


def greedy_answers(
    args: Any, prompts: list[str], max_new_tokens: int = 32, runner: Any = None
) -> list[str]:
    """Greedy chat answers of the engine built from `args` (on `runner` when one is already
    loaded), all prompts in one batch (so the decode steps run at the batch size the
    small-batch kernels serve)."""
    from radixserve.engine.engine_process import eos_token_ids
    from radixserve.engine.io_struct import TokenizedGenerateReq
    from radixserve.engine.model_runner import ModelRunner
    from radixserve.engine.sampling_params import SamplingParams
    from radixserve.engine.scheduler import Scheduler
    from radixserve.models.loader import load_tokenizer

    runner = runner or ModelRunner(args)
    tok = load_tokenizer(runner.source)
    sched = Scheduler(args, runner, tok, eos_token_ids(runner.config, tok, runner.source.folder))
    for i, prompt in enumerate(prompts):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
        sched.add_request(
            TokenizedGenerateReq(
                str(i), ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
            )
        )
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while sched.has_work():
        for o in sched.step():
            out[o.rid] += o.new_token_ids
    return [tok.decode(out[str(i)], skip_special_tokens=True).strip() for i in range(len(prompts))]
