"""Multi-LoRA: radixserve's greedy tokens against PEFT's, through the real server.

Adapters are made here with PEFT on the default model (random non-zero A and B, ranks 8 and
16, different target modules, one with rsLoRA), and PEFT's `generate` on the transformers
model gives the reference tokens, in float32 on both sides. One server serves three
adapters from --lora-paths (three slots: all three and the base model fit in one batch)
and loads a fourth at run time, which evicts the least recently used one from its slot.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from api_harness import DEFAULT_FLAGS, error_of, start_server
from radixserve.config import ServerArgs
from radixserve.layers.lora import LoraBatch, LoraSlots

KEY = "lora-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NEW_TOKENS = 12
PROMPTS = {
    "p0": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365],
    "p1": [1, 4093, 198, 19556, 314, 260, 3575, 282, 4649, 47],
    "p2": [504, 1380, 314, 7743, 28, 253, 1345],  # no BOS: nothing cached under sql yet
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "chat": dict(r=16, lora_alpha=32, use_rslora=True, target_modules=ALL),
    "math": dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"]),
    "extra": dict(r=16, lora_alpha=16, target_modules=["up_proj", "q_proj"]),  # loaded later
}


# the server's start and the reference model's load overlap; on a loaded 2-core machine
# the two together have taken over the default 600 s
pytestmark = pytest.mark.timeout(1500)


def _base_source():
    from radixserve.models.loader import default_model_path, resolve_model

    return resolve_model(default_model_path())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """The adapters, made by PEFT on a randomly initialised model of the default model's
    shape (an adapter's weights do not depend on the base weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    src = _base_source()
    config = AutoConfig.from_pretrained(src.folder, gguf_file=src.gguf_file)
    torch.manual_seed(0)
    model = None
    for name, kw in ADAPTERS.items():
        cfg = LoraConfig(init_lora_weights=False, **kw)  # random A and B, both non-zero
        if model is None:
            model = get_peft_model(AutoModelForCausalLM.from_config(config), cfg, name)
        else:
            model.add_adapter(name, cfg)
    root = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(root)
    return {name: str(root / name) for name in ADAPTERS}


@pytest.fixture(scope="module")
def started(folders):
    """The server, starting (its load overlaps the reference's)."""
    paths = [f"{n}={folders[n]}" for n in ("sql", "chat", "math")]
    flags = ["--lora-paths", *paths, "--max-loras", "3", "--max-lora-rank", "16"]
    srv = start_server(*DEFAULT_FLAGS, *flags, "--api-key", KEY)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def made(folders, started):
    """(the adapters' folders, PEFT's greedy tokens per (adapter or None, prompt)), from the
    saved adapters loaded onto the transformers model in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = _base_source()
    base = AutoModelForCausalLM.from_pretrained(
        src.folder, gguf_file=src.gguf_file, dtype=torch.float32
    ).eval()
    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    want = {}
    for name in [*names, None]:
        for key, ids in PROMPTS.items():
            want[name, key] = _peft_greedy(model, name, ids)
    return folders, want


def _peft_greedy(model, adapter: str | None, ids: list[int]) -> list[int]:
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(torch.tensor([ids]), **kw)
        else:
            model.set_adapter(adapter)
            out = model.generate(torch.tensor([ids]), **kw)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def server(started, made):
    started.wait_healthy(timeout=900)
    return started


def generate(server, key: str, lora: str | None, **extra) -> dict:
    body = {
        "input_ids": PROMPTS[key],
        "sampling_params": {
            "temperature": 0,
            "max_new_tokens": NEW_TOKENS,
            "min_new_tokens": NEW_TOKENS,
        },
        "lora_path": lora,
        **extra,
    }
    r = httpx.post(server.url + "/generate", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_three_adapters_and_the_base_in_one_batch_match_peft(server, made):
    _, want = made
    jobs = [(name, key) for name in ("sql", "chat", "math", None) for key in ("p0", "p1")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: generate(server, j[1], j[0])["output_ids"], jobs))
    for job, ids in zip(jobs, got, strict=True):
        assert ids == want[job], job
    # the adapters really change the output (else the comparison above proves little)
    assert len({tuple(want[n, "p0"]) for n in ("sql", "chat", "math", None)}) == 4


def test_prefix_cache_is_shared_within_an_adapter_never_across(server, made):
    _, want = made
    base = generate(server, "p2", None)
    assert base["output_ids"] == want[None, "p2"]
    first = generate(server, "p2", "sql")
    assert first["meta_info"]["cached_tokens"] == 0  # the base model's KV is not sql's
    again = generate(server, "p2", "sql")
    assert again["meta_info"]["cached_tokens"] > 0
    assert first["output_ids"] == again["output_ids"] == want["sql", "p2"]


def test_openai_clients_select_the_adapter_by_model(server, made):
    _, want = made
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    listed = {m.id: m for m in client.models.list().data}
    base = next(m for m in listed.values() if getattr(m, "parent", None) is None)
    assert {"sql", "chat", "math"} <= set(listed)
    assert listed["sql"].parent == base.id and listed["sql"].root.endswith("sql")
    tok = _tokenizer()
    for model in ("chat", f"{base.id}:chat"):
        out = client.completions.create(
            model=model,
            prompt=PROMPTS["p1"],
            max_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"min_tokens": NEW_TOKENS},
        )
        assert out.model == model
        assert out.choices[0].text == tok.decode(want["chat", "p1"], skip_special_tokens=True)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found"


def _tokenizer():
    from radixserve.models.loader import default_model_path, load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(default_model_path()), None)


def test_unknown_adapter_and_missing_key_are_refused(server):
    r = httpx.post(
        server.url + "/generate",
        json={"input_ids": [1, 2, 3], "lora_path": "nope"},
        headers=AUTH,
    )
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    body = {"lora_name": "x", "lora_path": "/tmp"}
    for path in ("/load_lora_adapter", "/v1/load_lora_adapter", "/unload_lora_adapter"):
        assert httpx.post(server.url + path, json=body).status_code == 401
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=AUTH)
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


def _bad_copy(folder: str, dest: Path, **changes) -> str:
    dest.mkdir()
    cfg = json.loads(Path(folder, "adapter_config.json").read_text())
    Path(dest, "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    Path(dest, "adapter_model.safetensors").write_bytes(
        Path(folder, "adapter_model.safetensors").read_bytes()
    )
    return str(dest)


def test_bad_adapters_are_400s_naming_the_problem(server, made, tmp_path):
    folders, _ = made
    cases = {
        "DoRA": _bad_copy(folders["sql"], tmp_path / "dora", use_dora=True),
        "bias": _bad_copy(folders["sql"], tmp_path / "bias", bias="all"),
        "--max-lora-rank": _bad_copy(folders["sql"], tmp_path / "rank", r=32),
        "embed_tokens": _bad_copy(
            folders["sql"], tmp_path / "mod", target_modules=["embed_tokens"]
        ),
        "modules_to_save": _bad_copy(folders["sql"], tmp_path / "mts", modules_to_save=["lm_head"]),
        "do not fit": _bad_copy(folders["sql"], tmp_path / "shape", r=4, lora_alpha=8),
        "not a folder": str(tmp_path / "missing"),
    }
    for what, path in cases.items():
        r = httpx.post(
            server.url + "/load_lora_adapter",
            json={"lora_name": "bad", "lora_path": path},
            headers=AUTH,
        )
        assert r.status_code == 400, (what, r.text)
        assert what in error_of(r)["message"], (what, r.text)
    names = [m["id"] for m in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]]
    assert "bad" not in names


def test_load_evict_and_unload_at_run_time(server, made):
    folders, want = made
    load = {"lora_name": "extra", "lora_path": folders["extra"]}
    for path in ("/v1/load_lora_adapter", "/load_lora_adapter"):  # the second is a no-op
        r = httpx.post(server.url + path, json=load, headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["success"], r.text
    other = {"lora_name": "extra", "lora_path": folders["sql"]}
    r = httpx.post(server.url + "/load_lora_adapter", json=other, headers=AUTH)
    assert r.status_code == 400
    # a fourth adapter over three slots: the least recently used idle one leaves its slot
    assert generate(server, "p0", "extra")["output_ids"] == want["extra", "p0"]
    with ThreadPoolExecutor(3) as pool:
        got = list(
            pool.map(lambda n: generate(server, "p1", n)["output_ids"], ["sql", "chat", "math"])
        )
    assert got == [want[n, "p1"] for n in ("sql", "chat", "math")]

    # unloading while a request runs on it: the unload waits for it, the request completes
    events: list[str] = []
    started = threading.Event()

    def stream() -> list[int]:
        body = {
            "input_ids": PROMPTS["p0"],
            "sampling_params": {"temperature": 0, "max_new_tokens": 48, "min_new_tokens": 48},
            "lora_path": "extra",
            "stream": True,
        }
        last = None
        with httpx.stream(
            "POST", server.url + "/generate", json=body, headers=AUTH, timeout=300
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line[6:])
                    started.set()
        events.append("stream done")
        return last

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(stream)
        assert started.wait(300)
        r = httpx.post(
            server.url + "/unload_lora_adapter",
            json={"lora_name": "extra"},
            headers=AUTH,
            timeout=300,
        )
        events.append("unloaded")
        last = fut.result()
    assert r.status_code == 200, r.text
    assert events == ["stream done", "unloaded"]
    assert len(last["output_ids"]) == 48 and last["output_ids"][:NEW_TOKENS] == want["extra", "p0"]
    r = httpx.post(
        server.url + "/generate", json={"input_ids": [1, 2], "lora_path": "extra"}, headers=AUTH
    )
    assert r.status_code == 404
    info = httpx.get(server.url + "/server_info", headers=AUTH).json()
    assert set(info["lora_adapters"]) == {"sql", "chat", "math"}
    assert info["max_loras"] == 3 and info["stats"]["max_loras"] == 3


# ---- without a server: the flags and the batched delta -----------------------------------------
def test_lora_flags():
    args = ServerArgs(lora_paths=["sql=/a", "chat=hf://org/repo@v1"])
    assert args.enable_lora and args.lora_sources() == {"sql": "/a", "chat": "hf://org/repo@v1"}
    env = {"RADIXSERVE_LORA_PATHS": "a=/x b=/y", "RADIXSERVE_MAX_LORAS": "4"}
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    from_env = ServerArgs.from_cli(parser.parse_args([]), env)
    assert from_env.lora_sources() == {"a": "/x", "b": "/y"} and from_env.max_loras == 4
    from_cli = ServerArgs.from_cli(parser.parse_args(["--lora-paths", "c=/z", "d=/w"]), {})
    assert list(from_cli.lora_sources()) == ["c", "d"]
    for bad in (["sql"], ["a:b=/x"], ["a=/x", "a=/y"]):
        with pytest.raises(ValueError):
            ServerArgs(lora_paths=bad)
    with pytest.raises(ValueError, match="tp-size"):
        ServerArgs(enable_lora=True, tp_size=2, dist_init_addr="127.0.0.1:1")


@pytest.mark.parametrize(
    "extend_lens", [[1] * 12, [40, 3, 1, 1, 25], [1, 30, 1, 1, 1, 1, 7, 1, 1, 1]]
)
def test_batched_delta_equals_each_rows_own_adapter(extend_lens):
    """Decoding rows take the padded bmm, prefill segments the loop over slices, a step may
    mix both; every row must get exactly its own adapter's x A^T B^T (the base rows
    nothing)."""
    torch.manual_seed(0)
    slots = LoraSlots(4, 8, 16, [6, 4], torch.float64, "cpu")
    ranks = {0: 8, 1: 4, 2: 2, 3: 8}
    for s, r in ranks.items():
        for part, out in enumerate((6, 4)):
            slots.write(s, part, torch.randn(r, 16), torch.randn(out, r))
    req_slots = [(i % 5) - 1 for i in range(len(extend_lens))]  # -1 is the base model
    lb = LoraBatch.build(req_slots, extend_lens, ranks, "cpu")
    x = torch.randn(sum(extend_lens), 16, dtype=torch.float64)
    base = torch.randn(x.shape[0], 10, dtype=torch.float64)
    got = slots.add_delta(base.clone(), x, lb)
    per_token = torch.repeat_interleave(torch.tensor(req_slots), torch.tensor(extend_lens))
    for row, s in enumerate(per_token.tolist()):
        want = base[row].clone()
        if s >= 0:
            want += x[row] @ slots.a[s].flatten(0, 1).t() @ slots.b[s].flatten(0, 1)
        torch.testing.assert_close(got[row], want)
