"""``python -m lorayard.server``: flags/env -> Settings -> uvicorn, with our own SIGTERM handling.

uvicorn re-raises SIGTERM after its graceful shutdown (the process would die by the signal); we
install our own handler instead: mark draining (new requests get 503), let the engine finish
in-flight requests and streams, then stop uvicorn and exit 0. A base that cannot be loaded (or is
refused: an unsupported architecture) stops the server at once with EXIT_LOAD_FAILED and the
reason on stderr; a server that will never be ready does not linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from lorayard.server.app import create_app
from lorayard.server.runtime import Runtime
from lorayard.server.settings import Settings, parse_settings

EXIT_LOAD_FAILED = 1
"""Exit status when the base model cannot be loaded or is refused."""


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, port_file: Path | None) -> None:
        super().__init__(config)
        self.port_file = port_file

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are ours (see _install_signal_handlers)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.port_file is not None and self.started:
            write_port_file(self.port_file, self.servers[0].sockets[0].getsockname()[1])


def write_port_file(path: Path, port: int) -> None:
    """The bound port, whole or not at all: a reader polling for the file never sees a partial one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{port}\n")
    partial.replace(path)


async def serve(settings: Settings) -> int:
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, settings.port_file)
    loop = asyncio.get_running_loop()
    shutdown: asyncio.Task[None] | None = None
    failed: list[str] = []

    def on_load_failed(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    runtime.on_load_failed = on_load_failed

    async def drain_then_exit() -> None:
        logging.getLogger("lorayard.server").info("signal received: draining in-flight requests")
        await runtime.drain()
        server.should_exit = True

    def on_signal() -> None:
        nonlocal shutdown
        if shutdown is None:
            shutdown = asyncio.ensure_future(drain_then_exit())
        else:  # a second signal: stop now
            server.force_exit = True
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await server.serve()
    if failed:
        print(f"lorayard server: {failed[0]}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
