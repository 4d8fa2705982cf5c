"""Every family beyond Llama against transformers' reference, in float32 on the CPU.

For a tiny random-weight config of each family, written by the test as a Hugging Face
folder: prefill logits within tolerance and 32 greedy tokens equal to transformers' (one
request); greedy tokens equal with several requests batched, prompts prefilled in small
chunks and a later request hitting the prefix cache; and with the model split over two
tensor-parallel CPU ranks (gloo). The configs make each family's specifics matter: a
sliding window shorter than the prompts, soft caps, per-type RoPE, expert routing. And
gpt-oss as released, its experts in MXFP4. Each family's folder and transformers' tokens
are made once for the module.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.engine import Engine
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from test_gpu_paths import fake_flashinfer  # noqa: F401 (a fixture)
from test_model_correctness import LOGIT_ATOL, prefill_logits
from tiny_models import default_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.slow

VOCAB = 320
NEW_TOKENS = 12
LONG_TOKENS = 32  # for the single-request check (PROMPTS[2])
COMMON = dict(dtype="float32", device="cpu", max_total_tokens=2048, watchdog_timeout=60.0)

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)

FAMILIES = {
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=3,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        attn_logit_softcapping=20.0,  # ignored by the reference and by us (gemma3.py)
        final_logit_softcapping=15.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        },
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        num_hidden_layers=3,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=40,
        norm_topk_prob=True,
        mlp_only_layers=[1],  # a dense layer between two sparse ones
        tie_word_embeddings=False,
    ),
    "mixtral": dict(
        model_type="mixtral",
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        tie_word_embeddings=False,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        num_hidden_layers=2,  # sliding, then full
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        swiglu_limit=0.05,  # small enough that the clamp bites on random weights
    ),
    "phi3": dict(
        model_type="phi3",
        num_hidden_layers=2,
        head_dim=16,  # hidden_size / heads, as Phi-3's RoPE assumes
        pad_token_id=0,  # Phi-3's defaults (32000) lie outside the tiny vocabulary
        eos_token_id=2,
        sliding_window=12,
        original_max_position_embeddings=128,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [2.0 + 0.1 * i for i in range(8)],
        },
        tie_word_embeddings=False,
    ),
}


def family_dir(path, family: str) -> str:
    """A seeded random model of `family` with the default model's tokenizer beside it (for
    the engine's front); norms and biases perturbed so they matter."""
    extra = dict(FAMILIES[family])
    cfg = AutoConfig.for_model(extra.pop("model_type"), **{**SIZES, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "sinks" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    default_tokenizer().save_pretrained(path)
    return str(path)


def reference(path: str, **kw):
    """transformers' model, eager (its SDPA path leaves out gpt-oss's sinks), generating
    past eos: the comparisons are of raw greedy tokens (ours run with ignore_eos)."""
    ref = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kw
    ).eval()
    ref.generation_config.eos_token_id = None
    return ref


def want(ref, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy tokens."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        gen = ref.generate(
            x,
            attention_mask=torch.ones_like(x),  # else ids equal to pad_token_id are masked
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


def ours(
    sched: Scheduler, prompts: list[list[int]], n: int = NEW_TOKENS
) -> tuple[list[list[int]], list[int]]:
    """Our greedy tokens for prompts submitted together, and each one's cached tokens."""
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, params))
    out: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    while sched.has_work():
        for o in sched.step():
            out.setdefault(o.rid, []).extend(o.new_token_ids)
            if o.finish_reason:
                cached[o.rid] = o.cached_tokens
    rids = [f"r{i}" for i in range(len(prompts))]
    return [out[r] for r in rids], [cached[r] for r in rids]


def scheduler(path: str, **flags) -> Scheduler:
    args = ServerArgs(model_path=path, **flags, **COMMON)
    return Scheduler(args, ModelRunner(args), tokenizer=None, eos_ids=[])


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [prompt(1, 40), prompt(2, 23), prompt(3, 57), prompt(4, 5)]
# starts with PROMPTS[0] and goes on: its first 40 tokens come from the prefix cache
EXTENDED = PROMPTS[0] + prompt(5, 15)


@pytest.fixture(scope="module")
def family_path(tmp_path_factory):
    """family -> its folder, each written once for the module."""
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = family_dir(tmp_path_factory.mktemp(family), family)
        return built[family]

    return get


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, family_path):
    """(name, folder, transformers' model, its tokens for PROMPTS then EXTENDED): NEW_TOKENS
    each, LONG_TOKENS for PROMPTS[2] (greedy: its first NEW_TOKENS are the short answer)."""
    path = family_path(request.param)
    ref = reference(path)
    expected = want(ref, PROMPTS[:2]) + want(ref, PROMPTS[2:3], LONG_TOKENS)
    expected += want(ref, [*PROMPTS[3:], EXTENDED])
    return request.param, path, ref, expected


def short(expected: list[list[int]]) -> list[list[int]]:
    return [tokens[:NEW_TOKENS] for tokens in expected]


def test_logits_and_greedy_tokens_match_transformers(family):
    _, path, ref, expected = family
    sched = scheduler(path)
    ids = PROMPTS[2]
    logits = prefill_logits(sched.runner, ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert (logits - theirs).abs().max().item() < LOGIT_ATOL
    assert ours(sched, [ids], LONG_TOKENS)[0] == [expected[2]]


@pytest.mark.parametrize("speculative", [None, "NGRAM"])
def test_batched_chunked_and_prefix_cached_match_transformers(family, speculative):
    """Also with n-gram speculation, whose verification extends each decoding request by
    several tokens in one step (windowed masks over a prefix, as a chunk's)."""
    _, path, _, expected = family
    sched = scheduler(path, chunked_prefill_size=16, speculative_algorithm=speculative)
    tokens, _ = ours(sched, PROMPTS)  # four together, the long ones in chunks of 16
    assert tokens == short(expected[: len(PROMPTS)])
    if speculative:
        assert sched.stats.spec_rounds > 0  # drafts were verified, not just switched on
    tokens, cached = ours(sched, [EXTENDED])
    assert cached[0] >= len(PROMPTS[0])  # the prefix really came from the cache
    assert tokens == expected[len(PROMPTS) :]


def test_two_tensor_parallel_ranks_match_transformers(family):
    _, path, _, expected = family
    with Engine(path, tp_size=2, **COMMON) as engine:
        sampling = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
        out = engine.generate(input_ids=PROMPTS, sampling_params=sampling)
    assert [r["output_ids"] for r in out] == short(expected[: len(PROMPTS)])


def test_moe_step_profile_splits_the_step(family_path):
    """`radixserve bench --offline --moe`'s profile: the hooks see the router, the experts
    and the attention of every step, and the parts add up to the step."""
    from radixserve.bench.moe import step_profile

    path = family_path("qwen3_moe")
    profile = step_profile(path, {"dtype": "float32", "device": "cpu"}, batch=2, prompt_len=8)
    for phase in ("prefill", "decode"):
        ms = profile[phase]
        assert min(ms["router"], ms["experts"], ms["attention"]) > 0
        parts = ms["router"] + ms["experts"] + ms["attention"] + ms["rest"]
        assert abs(parts - ms["total"]) < 1e-6 * max(ms["total"], 1)


def test_moe_flops_count_only_the_routed_experts(family_path):
    from radixserve.bench.offline import model_flops

    path = family_path("qwen3_moe")
    h, heads, kv, d = 64, 4, 2, 32
    attention = h * (heads + 2 * kv) * d + heads * d * h
    # qwen3_moe's config: 6 experts, top 2, 40 columns; layer 1 is dense (96 columns) but
    # the count takes every layer as sparse
    moe = h * 6 + 2 * 3 * h * 40
    assert model_flops(path, 10, 0) == 2 * 10 * 3 * (attention + moe)


# llama.cpp's names for a Qwen3-MoE layer's tensors (the experts' gate and up are stacked
# [E, I, H] tensors of their own there, one [E, 2I, H] tensor in transformers)
GGUF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
}


def tiny_qwen3_moe_gguf(path) -> str:
    """A random Qwen3-MoE written as a float32 GGUF the way llama.cpp lays one out. Its
    experts have 768 columns: transformers' GGUF reader has no key for
    moe_intermediate_size and leaves the config's default, 768."""
    from gguf import GGUFWriter

    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, num_experts=4, **SIZES)
    cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.tie_word_embeddings = 2, True, False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    inter = cfg.moe_intermediate_size
    out = path / "tiny-qwen3-moe.gguf"
    writer = GGUFWriter(str(out), "qwen3moe")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_vocab_size(cfg.vocab_size)
    for name, tensor in model.state_dict().items():
        if "norm" in name:
            tensor = tensor + torch.randn_like(tensor) * 0.1
        t = tensor.numpy()
        if name in GGUF_NAMES:
            writer.add_tensor(GGUF_NAMES[name], t)
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":
            writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", t[:, :inter].copy())
            writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", t[:, inter:].copy())
        else:
            writer.add_tensor(f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out)


def test_moe_experts_from_gguf_match_transformers(tmp_path):
    """Qwen3-MoE from a GGUF (stacked expert tensors, through transformers' GGUF reader)."""
    gguf = tiny_qwen3_moe_gguf(tmp_path)
    ref = reference(str(tmp_path), gguf_file=os.path.basename(gguf))
    sched = scheduler(gguf)
    ids = PROMPTS[2]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert (prefill_logits(sched.runner, ids) - theirs).abs().max().item() < LOGIT_ATOL
    assert ours(sched, [ids], 16)[0] == want(ref, [ids], 16)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., rows, cols] -> (blocks, scales) as the released gpt-oss files hold them,
    written here from the format's definition (transformers' quantizer needs Triton
    kernels): per 32 values one exponent 2 ** (scale - 127) putting the largest magnitude
    in [4, 8), each value rounded to the nearest of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} (its
    code: sign bit 3, magnitude index bits 0-2), the earlier value in the low nibble."""
    *lead, cols = w.shape
    groups = w.reshape(*lead, cols // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=2.0**-120)
    exp = torch.floor(torch.log2(amax)) - 2
    scaled = groups / torch.exp2(exp)[..., None]
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    index = (scaled.abs().clamp(max=6.0)[..., None] - magnitudes).abs().argmin(-1)
    codes = (index | (scaled < 0).long() << 3).reshape(*lead, cols // 32, 16, 2)
    blocks = (codes[..., 0] | codes[..., 1] << 4).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_checkpoint_matches_transformers(family_path, tmp_path):
    """gpt-oss's experts as the released checkpoints store them: `*_blocks` / `*_scales`
    tensors [E, out, in / 32, (16)] (gate and up rows interleaved) and an mxfp4
    quantization_config. We dequantize at load; transformers dequantizes with its own code
    (Mxfp4Config(dequantize=True), what it does on a CPU): the same logits and tokens."""
    from safetensors.torch import load_file, save_file
    from transformers import Mxfp4Config

    shutil.copytree(family_path("gpt_oss"), tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        # transformers' in-memory layout is [E, in, out]; the files' blocks run along `in`
        blocks, scales = mxfp4_quantize(tensors.pop(name).mT.contiguous())
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    layers = FAMILIES["gpt_oss"]["num_hidden_layers"]
    assert sum(n.endswith("_blocks") for n in tensors) == 2 * layers  # gate_up and down
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]
        + ["model.embed_tokens", "lm_head"],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    ref = reference(str(tmp_path), quantization_config=Mxfp4Config(dequantize=True))
    sched = scheduler(str(tmp_path))
    ids = PROMPTS[2]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert (prefill_logits(sched.runner, ids) - theirs).abs().max().item() < LOGIT_ATOL
    assert ours(sched, [ids], 16)[0] == want(ref, [ids], 16)


def test_gemma_chat_template_turns():
    """The template filled in for Gemma GGUFs: a system message goes into the first user
    turn, the assistant speaks as "model", every turn ends with <end_of_turn>."""
    from radixserve.models.gemma3 import CHAT_TEMPLATE

    tok = default_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    text = tok.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert text == (
        f"{tok.bos_token}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


@pytest.mark.usefixtures("fake_flashinfer")
def test_windowed_models_refuse_flashinfer(family_path):
    """FlashInfer's wrappers here take no window or sinks: asking for them is refused with
    the reason (auto takes the torch backend for such models)."""
    path = family_path("gemma3")
    with pytest.raises(ValueError, match="needs a sliding window.*--attention-backend torch"):
        ModelRunner(ServerArgs(model_path=path, attention_backend="flashinfer", **COMMON))


def test_moe_models_decode_without_cuda_graphs():
    """The grouped experts sync on the host, which a captured graph cannot replay."""
    from types import SimpleNamespace

    from radixserve.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
    from radixserve.models.phi3 import Phi3ForCausalLM

    runner = SimpleNamespace(
        device="cuda", args=SimpleNamespace(disable_cuda_graph=False), backend_name="flashinfer"
    )
    for cls in (Qwen3MoeForCausalLM, MixtralForCausalLM):
        runner.model = SimpleNamespace(supports_cuda_graphs=cls.supports_cuda_graphs)
        assert ModelRunner._init_cuda_graphs(runner) is None
    assert Phi3ForCausalLM.supports_cuda_graphs
