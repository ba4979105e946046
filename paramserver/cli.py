"""The command line: ``paramserver serve`` and ``paramserver demo``."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="paramserver: optimizer-as-a-service.")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address the control plane binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Control-plane port (0 = any free port).")] = 50051,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (e.g. 'auto'); default: start a local Ray.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all).")] = None,
    shard_host: Annotated[str, typer.Option(help="Address shard data ports bind ('0.0.0.0' on a multi-node cluster).")] = "127.0.0.1",
    grace: Annotated[float, typer.Option(help="Seconds in-flight calls get at shutdown.")] = 5.0,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "INFO",
) -> None:
    """Start the service; stop it with SIGTERM or Ctrl-C."""
    from paramserver.server import ServiceConfig
    from paramserver.server import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if address is None:  # a local Ray owned by this process: no token auth between its own parts
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    run(ServiceConfig(host=host, port=port, ray_address=address, num_cpus=num_cpus, shard_host=shard_host, grace_s=grace))


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Training steps.")] = 400,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    shards: Annotated[int, typer.Option(help="Shard actors.")] = 2,
    quick: Annotated[bool, typer.Option(help="A short run (40 steps).")] = False,
    address: Annotated[str | None, typer.Option(help="Use a running service instead of starting one.")] = None,
) -> None:
    """Train a tiny transformer with 2 workers through the service and compare with local torch.optim."""
    from paramserver.demo.run import run_demo

    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING)
    run_demo(40 if quick else steps, workers, shards, address=address)


def main() -> None:
    """Entry point of the ``paramserver`` script."""
    app()


if __name__ == "__main__":
    main()
