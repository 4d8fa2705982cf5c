"""Tensor-parallel faults as a client and an operator see them: a rank that dies takes
/health to 503 and the server down with a non-zero exit (Kubernetes restarts the pod)
instead of hanging it; a --tp-size the node's GPUs cannot hold is refused with the reason.
(Same greedy tokens at TP=2, a dead rank failing the requests in flight through the Engine,
two "nodes" and head splits are in test_tensor_parallel.py.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from api_harness import health_until_exit, start_server
from radixserve.engine.model_runner import ModelRunner
from test_tensor_parallel import tiny_qwen3_with_tokenizer

pytestmark = pytest.mark.slow


def spawned_children(pid: int) -> list[int]:
    """Processes that `pid` started with multiprocessing's spawn (not its resource tracker)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            found.append(int(d.name))
    return found


def test_dead_rank_turns_health_503_and_stops_the_server(tmp_path):
    model = tiny_qwen3_with_tokenizer(str(tmp_path / "qwen3"), heads=4, kv_heads=2)
    server = start_server(
        "--model", model, "--tp-size", "2", "--device", "cpu", "--dtype", "float32",
        "--max-total-tokens", "2048", "--watchdog-timeout", "60",
    )  # fmt: skip
    try:
        server.wait_healthy()
        r = httpx.post(
            server.url + "/generate",
            json={"input_ids": [1, 5, 9], "sampling_params": {"max_new_tokens": 4}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        engine = httpx.get(server.url + "/server_info").json()["engine_pid"]
        (rank1,) = [p for p in spawned_children(server.proc.pid) if p != engine]
        os.kill(rank1, signal.SIGKILL)
        statuses = health_until_exit(server)
        assert server.proc.wait(60) != 0
        assert 503 in statuses and 200 not in statuses[statuses.index(503) :]
        # told by rank 0's failed collective or by the front's watch on the rank's process
        assert "engine died" in server.log()
    finally:
        server.stop()


def test_tp_size_beyond_the_nodes_gpus_refused_with_the_reason(monkeypatch):
    """Checked from the device count before the process group or any weights (a CPU
    machine stands in for a node with 4 GPUs)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    runner = SimpleNamespace(tp_size=8, rank=0, args=SimpleNamespace(nnodes=1))
    with pytest.raises(ValueError, match=r"--tp-size 8 over 1 node\(s\) needs 8 GPUs per node"):
        ModelRunner._rank_device(runner, "cuda")
    runner = SimpleNamespace(tp_size=8, rank=5, args=SimpleNamespace(nnodes=2))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    assert ModelRunner._rank_device(runner, "cuda") == "cuda:1"  # 4 per node: node 1's second
