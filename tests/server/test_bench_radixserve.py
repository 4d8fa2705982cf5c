"""`radixserve bench` against our own server: the native backend, and the structured-output
workload that reports what JSON-schema requests cost against plain ones."""

from __future__ import annotations

import json

import pytest
from api_harness import Server
from radixserve.bench import main as bench_main
from radixserve.bench.metrics import RequestResult, constrained_cost

pytestmark = pytest.mark.slow


def test_constrained_cost_arithmetic():
    plain = RequestResult(success=True, output_len=11, ttft=0.1, latency=1.1)  # 100 ms/token
    schema = RequestResult(
        success=True, output_len=6, ttft=0.1, latency=0.85, constrained=True
    )  # 150
    cost = constrained_cost([plain, schema, RequestResult(success=False, constrained=True)])
    assert cost == pytest.approx(
        {"tpot_constrained_ms": 150.0, "tpot_plain_ms": 100.0, "tpot_ratio": 1.5}
    )
    assert constrained_cost([plain]) is None


@pytest.mark.parametrize("backend", ["radixserve", "openai-chat"])
def test_bench_with_json_schema_requests(api_server: Server, tmp_path, backend):
    out = tmp_path / "r.jsonl"
    argv = [
        "--backend", backend,
        "--base-url", api_server.url,
        "--dataset-name", "random",
        "--random-input-len", "16",
        "--random-output-len", "12",
        "--random-range-ratio", "1.0",
        "--num-prompts", "8",
        "--max-concurrency", "4",
        "--warmup-requests", "1",
        "--json-schema-ratio", "0.5",
        "--output-file", str(out),
        "--disable-tqdm",
    ]  # fmt: skip
    assert bench_main(argv) == 0
    rec = json.loads(out.read_text())
    assert (rec["completed"], rec["failed"]) == (8, 0)
    assert rec["json_schema_ratio"] == 0.5
    assert rec["tpot_constrained_ms"] > 0 and rec["tpot_plain_ms"] > 0
    assert rec["tpot_ratio"] == pytest.approx(rec["tpot_constrained_ms"] / rec["tpot_plain_ms"])
