"""Control messages beside the request flow, handled in the engine loop: a weights update
(drained: new requests are held until the running ones finish and the swap is done) and
the torch profiler (one trace per start/stop, written by rank 0's process)."""

from __future__ import annotations

import logging
import os
import time

import torch

from radixserve.engine.io_struct import (
    AbortReq,
    ControlReply,
    ProfileReq,
    TokenizedGenerateReq,
    UpdateWeightsReq,
)

logger = logging.getLogger("radixserve.engine")


class EngineControl:
    """What the loop consults between steps. The worker it drives needs
    `update_weights(path) -> path` and `has_work()`, `receive(msg)`."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.update: UpdateWeightsReq | None = None
        self.held: list[TokenizedGenerateReq] = []
        self.profiler: torch.profiler.profile | None = None
        self.profile_dir: str | None = None

    # ---- weights -------------------------------------------------------------------------------
    def request_update(self, msg: UpdateWeightsReq) -> ControlReply | None:
        """Start draining for `msg`; a reply now only when one update already waits."""
        if self.update is not None:
            return ControlReply(msg.rid, False, "another weights update is in progress")
        self.update = msg
        logger.info("weights update to %s: draining running requests", msg.model_path)
        return None

    def holds(self, msg: object) -> bool:
        """While an update drains, a new request waits here instead of being admitted, and
        an abort of a held request drops it (the front has already given up on it)."""
        if self.update is None:
            return False
        if isinstance(msg, TokenizedGenerateReq):
            self.held.append(msg)
            return True
        if isinstance(msg, AbortReq):
            kept = [r for r in self.held if r.rid != msg.rid]
            dropped = len(kept) < len(self.held)
            self.held = kept
            return dropped
        return False

    def swap_if_drained(self) -> ControlReply | None:
        """Once no request runs, swap the weights and admit the held requests."""
        if self.update is None or self.worker.has_work():
            return None
        msg, self.update = self.update, None
        try:
            path = self.worker.update_weights(msg.model_path)
            reply = ControlReply(msg.rid, True, f"weights reloaded from {path}", path)
        except Exception as e:  # the old weights keep serving
            logger.error("weights update failed: %s", e)
            reply = ControlReply(msg.rid, False, f"{type(e).__name__}: {e}")
        for req in self.held:
            self.worker.receive(req)
        self.held = []
        return reply

    # ---- profiler -------------------------------------------------------------------------------
    def profile(self, msg: ProfileReq) -> ControlReply:
        if msg.action == "start":
            if self.profiler is not None:
                return ControlReply(msg.rid, False, "the profiler is already running")
            if not msg.output_dir:
                return ControlReply(msg.rid, False, "no output directory for the trace")
            os.makedirs(msg.output_dir, exist_ok=True)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
            self.profile_dir = msg.output_dir
            return ControlReply(msg.rid, True, f"profiling; the trace goes to {msg.output_dir}")
        if self.profiler is None:
            return ControlReply(msg.rid, False, "the profiler is not running")
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        path = os.path.join(self.profile_dir, f"radixserve-{int(time.time() * 1000)}.trace.json")
        profiler.export_chrome_trace(path)
        logger.info("profiler trace written to %s", path)
        return ControlReply(msg.rid, True, f"trace written to {path}", path)
