"""Multi-LoRA: radixserve's greedy tokens against PEFT's, through the real server.

Adapters are made here with PEFT on the default model (random non-zero A and B, ranks 8 and
16, different target modules, one with rsLoRA), and PEFT's `generate` on the transformers
model gives the reference tokens, in float32 on both sides. One server serves three
adapters from --lora-paths (three slots: all three and the base model fit in one batch)
and loads a fourth at run time, which evicts the least recently used one from its slot.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from api_harness import DEFAULT_FLAGS, error_of, start_server
from peft_reference import load_peft, peft_greedy
from radixserve.config import ServerArgs
from radixserve.layers import cpu_kernels
from radixserve.layers.lora import LoraBatch, LoraRows, LoraSlots

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
def remote(folders, tmp_path_factory):
    """The adapters as remote sources without a network: a Hugging Face cache laid out as
    huggingface_hub's (models--org--hub-NAME/snapshots/<rev>/, refs/main) for hf://org/hub-NAME
    under HF_HUB_OFFLINE=1, and an HTTP server on 127.0.0.1 serving each adapter's folder
    at URL/NAME/. Yields (the server's environment, the URL)."""
    root = tmp_path_factory.mktemp("remote")
    for name, folder in folders.items():
        repo = root / "hub" / f"models--org--hub-{name}"
        snapshot = repo / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(Path(folder, f), snapshot / f)
    web = Path(next(iter(folders.values()))).parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(web))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(root / "xdg"),  # where URL sources are downloaded to
    }
    try:
        yield env, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def started(folders, remote):
    """The server, starting (its load overlaps the reference's)."""
    env, url = remote
    paths = [f"{n}={folders[n]}" for n in ("sql", "chat", "math")]
    paths += ["hub=hf://org/hub-sql", f"web={url}/math"]  # remote sources at start
    flags = ["--lora-paths", *paths, "--max-loras", "3", "--max-lora-rank", "16"]
    srv = start_server(*DEFAULT_FLAGS, *flags, "--api-key", KEY, env=env)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def made(folders, started):
    """(the adapters' folders, PEFT's greedy tokens per (adapter or None, prompt)), from the
    saved adapters loaded onto the transformers model in float32."""
    from transformers import AutoModelForCausalLM

    src = _base_source()
    base = AutoModelForCausalLM.from_pretrained(
        src.folder, gguf_file=src.gguf_file, dtype=torch.float32
    ).eval()
    model = load_peft(base, folders)
    want = {}
    for name in [*ADAPTERS, None]:
        for key, ids in PROMPTS.items():
            want[name, key] = peft_greedy(model, name, ids, NEW_TOKENS)
    return folders, want


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
    received: list[int] = []  # tokens the stream has received so far
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
                    received.append(len(last["output_ids"]))
                    started.set()
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
        at_unload = received[-1]
        last = fut.result()
    assert r.status_code == 200, r.text
    # the unload was asked after the first token and answered once the request finished;
    # the stream's last chunks and the unload's answer leave the server in the same step,
    # so the client may read the answer a chunk or two before the stream's end
    assert at_unload >= 24, at_unload
    assert len(last["output_ids"]) == 48 and last["output_ids"][:NEW_TOKENS] == want["extra", "p0"]
    r = httpx.post(
        server.url + "/generate", json={"input_ids": [1, 2], "lora_path": "extra"}, headers=AUTH
    )
    assert r.status_code == 404
    info = httpx.get(server.url + "/server_info", headers=AUTH).json()
    assert set(info["lora_adapters"]) == {"sql", "chat", "math", "hub", "web"}
    assert info["max_loras"] == 3 and info["stats"]["max_loras"] == 3


def test_remote_sources_hf_and_url(server, made, remote):
    """--lora-paths took hf://org/hub-sql (from the offline Hugging Face cache) and a URL of
    math's folder; the load endpoint takes both kinds too; each serves its adapter's
    tokens. A missing repo and a bad URL are 400s naming the source."""
    folders, want = made
    _, url = remote
    assert generate(server, "p0", "hub")["output_ids"] == want["sql", "p0"]
    assert generate(server, "p1", "web")["output_ids"] == want["math", "p1"]
    loads = {"hub-chat": "hf://org/hub-chat@main", "web-extra": f"{url}/extra/"}
    for name, source in loads.items():
        r = httpx.post(
            server.url + "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": source},
            headers=AUTH,
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["success"], r.text
    assert generate(server, "p2", "hub-chat")["output_ids"] == want["chat", "p2"]
    assert generate(server, "p0", "web-extra")["output_ids"] == want["extra", "p0"]
    bad = {
        "hf://org/missing": "hf://org/missing",
        "hf://org/hub-sql@v9": "hf://org/hub-sql@v9",
        f"{url}/nowhere": f"{url}/nowhere/adapter_config.json",
        "http://127.0.0.1:9/x": "http://127.0.0.1:9/x/",  # nothing listens on port 9
    }
    for source, named in bad.items():
        r = httpx.post(
            server.url + "/load_lora_adapter",
            json={"lora_name": "bad", "lora_path": source},
            headers=AUTH,
            timeout=120,
        )
        assert r.status_code == 400, (source, r.text)
        assert named in error_of(r)["message"], (source, r.text)
    for name in loads:
        r = httpx.post(
            server.url + "/unload_lora_adapter", json={"lora_name": name}, headers=AUTH, timeout=300
        )
        assert r.status_code == 200, r.text
    names = {m["id"] for m in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]}
    assert {"hub", "web"} <= names and not names & {"bad", *loads}


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


def _reference_case(seed: int, ranks: dict[int, int]):
    """Random adapters per slot for a fused projection of two parts (16 -> 6 + 4): each
    part's A [r, 16], B [out, r] and a scale, kept apart from the slots' copies."""
    g = torch.Generator().manual_seed(seed)
    slots = LoraSlots(16, 16, 16, [6, 4], torch.float32, "cpu")
    weights = {}
    for s, r in ranks.items():
        for part, out in enumerate((6, 4)):
            a, b = torch.randn(r, 16, generator=g), torch.randn(out, r, generator=g)
            scale = 0.5 + s
            weights[s, part] = (a, b, scale)
            slots.write(s, part, a, b * scale)
    return slots, weights


def _reference(x: torch.Tensor, base: torch.Tensor, per_row: list[int], weights) -> torch.Tensor:
    """Row by row: base + x A^T B^T * scale of the row's own adapter, part by part."""
    want = base.clone()
    for row, s in enumerate(per_row):
        if s >= 0:
            for part, cols in enumerate((slice(0, 6), slice(6, 10))):
                a, b, scale = weights[s, part]
                want[row, cols] += x[row] @ a.t() @ b.t() * scale
    return want


CASES = {
    "decode, one adapter": ([3] * 32, [1] * 32),
    "decode, 16 adapters and the base": ([(i % 17) - 1 for i in range(40)], [1] * 40),
    "decode, two far apart slots and drafts": ([1, 14, 14, 1], [1, 5, 1, 1]),
    "decode, 300 rows, 16 adapters and the base": ([(i % 17) - 1 for i in range(300)], [1] * 300),
    "prefill, four adapters and the base": ([0, -1, 5, 5, 11], [40, 33, 20, 17, 64]),
    "mixed: prefill, drafts, decode": (
        [2, 7, -1, 4, 9, *(i % 5 for i in range(24))],
        [100, 9, 30, 5, 3, *[1] * 24],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_delta_equals_each_rows_own_adapter(case):
    """Every form the step plan picks (segments, single, grouped) gives each row
    exactly its own adapter's delta and the base rows nothing, for ranks 8 and 16 mixed."""
    req_slots, lens = CASES[case]
    ranks = {s: (8, 16)[s % 2] for s in range(16)}
    slots, weights = _reference_case(0, ranks)
    lb = LoraBatch.build(req_slots, lens, ranks, "cpu")
    x = torch.randn(sum(lens), 16)
    base = torch.randn(x.shape[0], 10)
    got = slots.add_delta(base.clone(), x, lb)
    per_row = torch.repeat_interleave(torch.tensor(req_slots), torch.tensor(lens)).tolist()
    torch.testing.assert_close(got, _reference(x, base, per_row, weights), rtol=1e-4, atol=1e-4)


def test_plan_picks_the_cheap_form():
    ranks = dict.fromkeys(range(16), 16)
    assert LoraBatch.build([-1] * 4, [1] * 4, ranks, "cpu") is None
    assert LoraBatch.build([3] * 32, [1] * 32, ranks, "cpu").mode == "single"
    lb = LoraBatch.build([i % 16 for i in range(32)], [1] * 32, ranks, "cpu")
    assert lb.mode == "grouped" and (lb.num_slots, lb.widest) == (16, 2)
    lb = LoraBatch.build([1, 1, 2, -1, 2, 2], [50, 30, 20, 9, 1, 1], ranks, "cpu")
    assert lb.segments == [(0, 80, 1, 16), (80, 100, 2, 16)]
    assert lb.start == 109 and lb.mode == "single"


@pytest.mark.skipif(
    not cpu_kernels.lora_delta_available(), reason="needs AVX512_BF16 (the C delta's build)"
)
@pytest.mark.parametrize("parts", [(48, 32), (24, 16)], ids=["pairs", "float32-expand"])
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_c_delta_gives_each_row_its_own_adapter(case, parts, monkeypatch):
    """The C delta (one call per projection for any step) against float32 arithmetic on the
    same bfloat16 weights: each LoRA row gets its own adapter's delta to bfloat16's
    precision and the base rows are untouched, for ranks 8, 16 and 5; outputs of 16
    columns a unit take the dot product expand, of 8 the float32 one."""
    calls = []
    real = cpu_kernels.lora_delta
    monkeypatch.setattr(cpu_kernels, "lora_delta", lambda *a: calls.append(1) or real(*a))
    req_slots, lens = CASES[case]
    ranks = {s: (8, 16, 5)[s % 3] for s in range(16)}  # an odd rank: a half pair
    g = torch.Generator().manual_seed(1)
    slots = LoraSlots(16, 16, 64, list(parts), torch.bfloat16, "cpu")
    assert slots.kernel_shape is not None
    weights = {}
    for s, r in ranks.items():
        for part, out in enumerate(parts):
            a = torch.randn(r, 64, generator=g).bfloat16()
            b = (torch.randn(out, r, generator=g) * (0.5 + s / 8)).bfloat16()
            weights[s, part] = (a.float(), b.float())
            slots.write(s, part, a, b)
    lb = LoraBatch.build(req_slots, lens, ranks, "cpu")
    x = torch.randn(sum(lens), 64, generator=g).bfloat16()
    base = torch.randn(x.shape[0], sum(parts), generator=g).bfloat16()
    got = slots.add_delta(base.clone(), x, lb)
    assert calls, "the C delta did not run"
    per_row = torch.repeat_interleave(torch.tensor(req_slots), torch.tensor(lens)).tolist()
    want = base.float()
    bounds = [0, parts[0], sum(parts)]
    for row, s in enumerate(per_row):
        if s >= 0:
            for part in range(2):
                a, b = weights[s, part]
                want[row, bounds[part] : bounds[part + 1]] += x[row].float() @ a.t() @ b.t()
    lora = torch.tensor(per_row) >= 0
    assert torch.equal(got[~lora], base[~lora])
    delta, want_delta = (got.float() - base.float())[lora], (want - base.float())[lora]
    assert torch.nn.functional.cosine_similarity(delta, want_delta).min() > 0.999
    # to bfloat16's precision of the delta and of the sum (three roundings of ~0.4% each)
    err = (got.float() - want)[lora].abs().amax(-1)
    assert (err <= 0.02 * want[lora].abs().amax(-1) + 0.02 * want_delta.abs().amax(-1)).all()


@pytest.mark.parametrize("case", CASES)
def test_delta_keeps_every_tensor_on_the_step_device(case):
    """The slots, the plan and the rows on the meta device: a tensor made on the CPU in the
    delta's path (as a bare `torch.arange` was, crashing the grouped form on CUDA) fails
    here, without a GPU."""
    req_slots, lens = CASES[case]
    ranks = {s: (8, 16)[s % 2] for s in range(16)}
    for parts in ([6, 4], [10]):
        slots = LoraSlots(16, 16, 16, parts, torch.float16, "meta")
        for s, r in ranks.items():
            for part, out in enumerate(parts):
                slots.write(s, part, torch.randn(r, 16), torch.randn(out, r))
        lb = LoraBatch.build(req_slots, lens, ranks, "meta")
        x = torch.empty(sum(lens), 16, dtype=torch.float16, device="meta")
        got = slots.add_delta(
            torch.empty(x.shape[0], 10, dtype=torch.float16, device="meta"), x, lb
        )
        assert got.device.type == "meta" and got.shape == (x.shape[0], 10)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_fixed_shape_rows_form_gives_each_row_its_own_adapter(rows):
    """The form CUDA graphs capture (LoraRows: every row gathers its own slot, base rows
    masked, padding past the batch masked): each row's own adapter's delta, base and
    padding rows untouched; refilled for another mix of adapters, the same buffers give
    the new mix's deltas."""
    ranks = {s: (8, 16)[s % 2] for s in range(16)}
    slots, weights = _reference_case(0, ranks)
    rows_form = LoraRows(torch.zeros(rows + 3, dtype=torch.int64), torch.zeros(rows + 3))
    x = torch.randn(rows + 3, 16)
    base = torch.randn(rows + 3, 10)
    for seed in (0, 1):
        per_row = [
            int(s)
            for s in torch.randint(-1, 16, (rows,), generator=torch.Generator().manual_seed(seed))
        ]
        rows_form.fill(per_row)
        got = slots.add_delta(base.clone(), x, rows_form)
        want = _reference(x, base, per_row + [-1] * 3, weights)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        base_rows = torch.tensor(per_row + [-1] * 3) < 0
        assert torch.equal(got[base_rows], base[base_rows])
