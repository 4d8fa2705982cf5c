"""The engine's control messages without the HTTP layer: a weights update holds new requests
until the running ones drain, then swaps and admits them; the runner refuses weights of
another architecture and keeps serving the old ones."""

from __future__ import annotations

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.control import EngineControl
from radixserve.engine.io_struct import AbortReq, TokenizedGenerateReq, UpdateWeightsReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from tiny_models import tiny_qwen3


class FakeWorker:
    def __init__(self) -> None:
        self.running = 1
        self.received: list[str] = []
        self.loaded: list[str] = []
        self.fail = False

    def has_work(self) -> bool:
        return self.running > 0

    def receive(self, msg) -> None:
        self.received.append(msg.rid)

    def update_weights(self, path: str) -> str:
        if self.fail:
            raise ValueError("not the same architecture")
        self.loaded.append(path)
        return path


def _req(rid: str) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid, [1, 2], SamplingParams())


def test_update_drains_holds_new_requests_then_admits_them():
    worker = FakeWorker()
    control = EngineControl(worker)
    assert not control.holds(_req("before"))  # no update pending: requests flow
    assert control.request_update(UpdateWeightsReq("u1", "/m.gguf")) is None
    refused = control.request_update(UpdateWeightsReq("u2", "/m.gguf"))
    assert refused is not None and not refused.ok
    assert control.holds(_req("a")) and control.holds(_req("b"))
    assert control.holds(AbortReq("b"))  # the front gave up on b: dropped here
    assert not control.holds(AbortReq("running-one"))  # the worker's to abort
    assert control.swap_if_drained() is None and worker.loaded == []  # still running
    worker.running = 0
    reply = control.swap_if_drained()
    assert reply.ok and reply.rid == "u1" and worker.loaded == ["/m.gguf"]
    assert worker.received == ["a"]
    assert not control.holds(_req("after"))


def test_failed_update_still_admits_the_held_requests():
    worker = FakeWorker()
    worker.running, worker.fail = 0, True
    control = EngineControl(worker)
    control.request_update(UpdateWeightsReq("u", "/other"))
    control.holds(_req("a"))
    reply = control.swap_if_drained()
    assert not reply.ok and "architecture" in reply.message and worker.received == ["a"]


def _tiny(path, hidden: int) -> str:
    return tiny_qwen3(
        str(path),
        heads=2,
        kv_heads=1,
        head_dim=16,
        hidden_size=hidden,
        intermediate_size=64,
        vocab_size=300,
        max_position_embeddings=256,
    )


def test_runner_reloads_same_architecture_and_refuses_another(tmp_path):
    first = _tiny(tmp_path / "a", 32)
    args = ServerArgs(
        model_path=first, device="cpu", dtype="float32", quantization="none", max_total_tokens=64
    )
    runner = ModelRunner(args)
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    with pytest.raises(ValueError, match="hidden_size"):
        runner.reload_weights(_tiny(tmp_path / "b", 48))
    kept = runner.model.state_dict()
    assert all(torch.equal(before[k], kept[k]) for k in before)
    old_model = runner.model
    assert runner.reload_weights(first) == runner.source.path
    assert runner.model is not old_model
    reloaded = runner.model.state_dict()
    assert all(torch.equal(before[k], reloaded[k]) for k in before)
