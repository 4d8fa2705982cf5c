"""Tensor-parallel ranks other than 0: load a share of the model, run what rank 0 broadcasts.

They have no scheduler and no socket to the front: a rank that fails exits non-zero, and
that is how it reports. On node 0 the front watches its own rank processes; rank 0 sees a
dead rank on any node as a failed collective and reports that to the front. On the other
nodes `radixserve serve --node-rank N` runs `run_worker_node`, which starts the node's
ranks and exits when one of them does (non-zero on a failure, so the pod restarts).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time

import torch

from radixserve.config import ServerArgs
from radixserve.engine.engine_process import prepare_engine_env

logger = logging.getLogger("radixserve.engine")


def local_ranks(args: ServerArgs) -> range:
    """The global ranks this node runs: node k holds the k-th contiguous run."""
    per_node = args.tp_size // args.nnodes
    return range(args.node_rank * per_node, (args.node_rank + 1) * per_node)


def tp_worker_main(args: ServerArgs, rank: int) -> None:
    """Process entry point of one rank above 0."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s rank{rank} %(levelname)s %(message)s",
    )
    local_ranks = args.tp_size // args.nnodes
    torch.set_num_threads(max(1, args.cpu_threads or len(os.sched_getaffinity(0)) // local_ranks))
    from radixserve.engine.model_runner import ModelRunner
    from radixserve.models.loader import gguf_parsed_once

    try:
        with gguf_parsed_once():
            runner = ModelRunner(args, rank)
        runner.worker_loop()
    except Exception as e:
        logger.error("rank %d failed: %s: %s", rank, type(e).__name__, e)
        raise SystemExit(1) from e
    logger.info("rank %d stopped", rank)


def start_rank_processes(args: ServerArgs, ranks: range) -> list[mp.process.BaseProcess]:
    prepare_engine_env()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=tp_worker_main, args=(args, r), daemon=True, name=f"radixserve-rank{r}")
        for r in ranks
    ]
    for p in procs:
        p.start()
    return procs


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)  # unwinds through run_worker_node's cleanup


def run_worker_node(args: ServerArgs) -> int:
    """`radixserve serve --node-rank N` (N > 0): run this node's ranks, no HTTP front.

    Returns when a rank exits: 0 once all stopped cleanly (node 0 shut down), else the
    failed rank's exit code, after stopping the rest; a dead group cannot serve anyway.
    SIGTERM stops this node's ranks and returns 0 (node 0 then sees the group broken).
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ranks = local_ranks(args)
    logger.info(
        "node %d of %d: ranks %d-%d joining %s",
        args.node_rank,
        args.nnodes,
        ranks.start,
        ranks.stop - 1,
        args.dist_init_addr,
    )
    procs = start_rank_processes(args, ranks)
    try:
        while True:
            codes = [p.exitcode for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                logger.error("a rank exited with code %s: stopping this node", failed[0])
                return failed[0] if failed[0] > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
