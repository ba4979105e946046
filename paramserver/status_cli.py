"""``paramserver jobs`` and ``paramserver status JOB``: a running service's jobs as tables.

Both ask the front door (ListJobs, GetJob) with the Python client, so they take its credentials:
``--token`` or ``$PARAMSERVER_TOKEN`` (an admin token, or a job's worker token for ``status``),
and ``$PARAMSERVER_TLS_CA`` / ``_CERT`` / ``_KEY`` for TLS. ``--watch`` redraws every
``--interval`` seconds until Ctrl-C (exit 0); ``--json`` prints proto3 JSON for scripts (worker
tokens blanked). An error answer prints one red line ``CODE REASON: message`` on stderr and exits 2.

rich and the client are imported inside the commands, so ``paramserver --help`` stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from paramserver_client import JobClient, ServiceError

T = TypeVar("T")

#: The environment variable --address defaults to.
ADDRESS_ENV = "PARAMSERVER_ADDRESS"
DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Deadline of each GetJob / ListJobs call.
CALL_TIMEOUT_S = 15.0
#: The exit status of an error answer.
ERROR_EXIT = 2

AddressOpt = Annotated[str, typer.Option("--address", envvar=ADDRESS_ENV, help="The service's front door (host:port).")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", help="Admin token (for `status` also the job's worker token); default: $PARAMSERVER_TOKEN.", show_default=False
    ),
]
WatchOpt = Annotated[bool, typer.Option("--watch", "-w", help="Redraw every --interval seconds until Ctrl-C.")]
IntervalOpt = Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between redraws of --watch.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print proto3 JSON instead of tables (worker tokens blanked).")]

#: How --watch waits between redraws (tests replace it).
sleep: Callable[[float], None] = time.sleep


def jobs_command(
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = None,
    watch: WatchOpt = False,
    interval: IntervalOpt = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """List the service's jobs: state, version, steps/s, workers, shards, the open step and the last snapshot."""
    from paramserver import status_view as view

    _no_json_watch(as_json, watch)
    with _client(address, token) as client:
        _show(client.list_jobs, view.jobs_table, view.jobs_json, as_json=as_json, watch=watch, interval=interval)


def status_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.", show_default=False)],
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = None,
    watch: WatchOpt = False,
    interval: IntervalOpt = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Show one job: state, pace and last snapshot; its workers in the open step; its shards' nodes,
    versions and memory; its skipped steps."""
    from paramserver import status_view as view

    _no_json_watch(as_json, watch)
    with _client(address, token) as client:
        _show(lambda: client.get_job(job_id), view.job_status, view.job_json, as_json=as_json, watch=watch, interval=interval)


# ---- the parts -------------------------------------------------------------------------------


def _no_json_watch(as_json: bool, watch: bool) -> None:
    if as_json and watch:
        raise typer.BadParameter("--json prints once: drop --watch (or loop in the script)", param_hint="--json")


@contextmanager
def _client(address: str, token: str | None) -> Iterator[JobClient]:
    """A JobClient (token: the argument, else $PARAMSERVER_TOKEN; TLS from the environment); a
    credentials problem (a client certificate without its key, an unreadable file) exits 2."""
    from paramserver_client import JobClient

    try:
        client = JobClient(address, token=token, timeout=CALL_TIMEOUT_S)
    except (ValueError, OSError) as exc:
        _fail(f"INVALID_ARGUMENT credentials: {exc}")
    with client:
        yield client


def _fail(line: str) -> NoReturn:
    typer.secho(" ".join(line.splitlines()), fg="red", err=True)
    raise typer.Exit(ERROR_EXIT)


def _error_line(err: ServiceError) -> str:
    """``CODE REASON: message`` on one line."""
    return " ".join(str(err).splitlines())


def _fetch(fetch: Callable[[], T]) -> T:
    """fetch(); an error answer exits 2 with its one red line."""
    from paramserver_client import ServiceError

    try:
        return fetch()
    except ServiceError as err:
        _fail(_error_line(err))


def _show(
    fetch: Callable[[], T],
    render: Callable[[T], RenderableType],
    to_json: Callable[[T], str],
    *,
    as_json: bool,
    watch: bool,
    interval: float,
) -> None:
    from rich.console import Console

    if as_json:
        typer.echo(to_json(_fetch(fetch)))
    elif watch:
        _watch(fetch, render, interval, Console())
    else:
        Console().print(render(_fetch(fetch)))


def _watch(fetch: Callable[[], T], render: Callable[[T], RenderableType], interval: float, console: Console) -> None:
    """Redraw render(fetch()) every `interval` seconds until Ctrl-C (then return: exit 0). The first
    fetch failing exits 2; a later error is shown under the last good view, and the watch goes on
    (the service may be restarting)."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from paramserver_client import ServiceError

    def frame(data: T, fetched_at: float, error: ServiceError | None) -> Group:
        footer = Text(f"{time.strftime('%H:%M:%S', time.localtime(fetched_at))}  every {interval:g}s  Ctrl-C to quit", style="dim")
        parts: list[RenderableType] = [render(data), footer]
        if error is not None:
            parts.append(Text(f"{_error_line(error)} (view from {time.time() - fetched_at:.0f}s ago; retrying)", style="red"))
        return Group(*parts)

    try:
        data, fetched_at = _fetch(fetch), time.time()
        with Live(frame(data, fetched_at, None), console=console, auto_refresh=False, redirect_stderr=False) as live:
            while True:
                sleep(interval)
                error: ServiceError | None = None
                try:
                    data, fetched_at = fetch(), time.time()
                except ServiceError as err:
                    error = err
                live.update(frame(data, fetched_at, error), refresh=True)
    except KeyboardInterrupt:
        return
