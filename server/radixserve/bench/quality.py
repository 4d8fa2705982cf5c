"""Next-token agreement of a lossy path with float32: teacher-forced top-1 over ShareGPT text.

Each segment of natural text is run as one prefill; at every position the lossy path's
most likely next token is compared with the exact path's (float32, no quantization). The
same token ids can be sent to llama.cpp's server one prefix at a time (`llama_top1`), so
its Q8-activation path over the same Q4 weights is measured the same way.
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
