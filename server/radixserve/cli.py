"""`radixserve serve [flags]` runs the HTTP server; `radixserve bench ...` the benchmark.

The server runs uvicorn (uvloop) with our own signal handling: SIGTERM drains (503 to new
requests, in-flight ones finish up to --shutdown-timeout) and exits 0, while a model that
cannot load or an engine that dies exits 1, so Kubernetes restarts the pod.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from radixserve import __version__
from radixserve.config import ServerArgs

logger = logging.getLogger("radixserve")


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radixserve serve",
        description="Serve a model over an OpenAI-compatible HTTP API. Every flag also reads "
        "RADIXSERVE_<FLAG> from the environment; the command line wins.",
    )
    ServerArgs.add_cli_args(parser)
    return parser


def serve(argv: list[str]) -> int:
    ns = _serve_parser().parse_args(argv)
    try:
        args = ServerArgs.from_cli(ns)
    except ValueError as e:
        print(f"radixserve serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.node_rank > 0:  # a node that only runs tensor-parallel ranks: no HTTP front
        from radixserve.engine.tp_worker import run_worker_node

        return run_worker_node(args)
    return run_server(args)


def run_server(args: ServerArgs) -> int:
    """Serve until SIGTERM (drained, 0), SIGINT (0), or a fatal engine error (1)."""
    import uvicorn

    from radixserve.api.app import create_app

    app = create_app(args)
    state = app.state.server
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="none",
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
    )
    server = _Server(config, state)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(server.serve())
    return state.exit_code


class _Server:
    """uvicorn's Server, with SIGTERM meaning 'drain' and the app able to stop it."""

    def __init__(self, config, state) -> None:
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                # our handlers, and no re-raise of the signal afterwards (uvicorn's default),
                # which would turn a clean drain into death by SIGTERM
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGTERM, outer.on_sigterm)
                loop.add_signal_handler(signal.SIGINT, outer.on_sigint)
                try:
                    yield
                finally:
                    loop.remove_signal_handler(signal.SIGTERM)
                    loop.remove_signal_handler(signal.SIGINT)

        self.server = Server(config)
        self.state = state
        self.tasks: list[asyncio.Task] = []

    async def serve(self) -> None:
        self.tasks.append(asyncio.create_task(self._stop_when_asked()))
        try:
            await self.server.serve()
        finally:
            for t in self.tasks:
                t.cancel()

    async def _stop_when_asked(self) -> None:
        while not self.server.started and not self.server.should_exit:
            await asyncio.sleep(0.05)
        await self.state.stop.wait()
        self.server.should_exit = True

    def on_sigterm(self) -> None:
        if self.state.draining:
            return
        logger.info("SIGTERM: draining")
        self.tasks.append(asyncio.create_task(self.state.drain(self.state.args.shutdown_timeout)))

    def on_sigint(self) -> None:
        if self.server.should_exit:
            self.server.force_exit = True
        self.state.draining = True
        self.server.should_exit = True


def bench(argv: list[str]) -> int:
    from radixserve.bench import main as bench_main  # lazy: the server never needs it

    return bench_main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "bench": bench}
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: radixserve {{{','.join(commands)}}} ... (radixserve COMMAND --help)")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    command = commands.get(argv[0])
    if command is None:
        print(
            f"radixserve: error: unknown command {argv[0]!r}; use serve or bench", file=sys.stderr
        )
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
