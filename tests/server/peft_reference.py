"""PEFT's greedy tokens as the reference for radixserve's LoRA paths (tests/server/test_lora.py
on the CPU through the server, test_lora_gpu.py on CUDA through the scheduler)."""

from __future__ import annotations

import torch


def load_peft(base, folders: dict[str, str]):
    """`base` (a transformers model) with every adapter of `folders` loaded by PEFT."""
    from peft import PeftModel

    names = list(folders)
    model = PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    return model.eval()


def peft_greedy(model, adapter: str | None, ids: list[int], new_tokens: int, *, top2=False):
    """`new_tokens` greedy tokens after `ids` under `adapter` (None: the base model), on the
    model's device. With `top2`, also each token's two best (id, logprob) pairs, from the
    raw logits."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    kw |= dict(output_logits=True, return_dict_in_generate=True)
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(prompt, **kw)
        else:
            model.set_adapter(adapter)
            out = model.generate(prompt, **kw)
    tokens = out.sequences[0, len(ids) :].tolist()
    if not top2:
        return tokens
    pairs = []
    for logits in out.logits:
        lp, idx = torch.log_softmax(logits[0].float(), -1).topk(2)
        pairs.append(list(zip(idx.tolist(), lp.tolist(), strict=True)))
    return tokens, pairs
