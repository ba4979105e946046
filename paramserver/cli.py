"""The command line: ``paramserver serve``, ``paramserver demo`` and ``paramserver hash-token``."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from paramserver.access import AuthConfig, hash_token, load_tenants
from paramserver.tls import TlsConfig

#: The environment variable `serve` takes a single tenant's admin token from.
ADMIN_TOKEN_ENV = "PARAMSERVER_ADMIN_TOKEN"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="paramserver: optimizer-as-a-service.")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address the control plane binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Control-plane port (0 = any free port).")] = 50051,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (e.g. 'auto'); default: start a local Ray.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all).")] = None,
    shard_host: Annotated[str, typer.Option(help="Address shard data ports bind ('0.0.0.0' on a multi-node cluster).")] = "127.0.0.1",
    grace: Annotated[float, typer.Option(help="Seconds in-flight calls get at shutdown.")] = 5.0,
    snapshot_dir: Annotated[str, typer.Option(help="Where snapshots are written (shared by all nodes).")] = "snapshots",
    spill_dir: Annotated[str, typer.Option(help="Where shards over their memory budget spill state (local NVMe).")] = "spill",
    shard_start_timeout: Annotated[
        float, typer.Option(help="Seconds a CreateJob waits for the cluster to place its shards before RESOURCE_EXHAUSTED.")
    ] = 120.0,
    name: Annotated[
        str, typer.Option(help="The service's name on its Ray cluster: a front door started again with it reattaches to the running jobs.")
    ] = "default",
    state_dir: Annotated[
        str, typer.Option(help="Where the coordinator keeps its journal (shared by the nodes that may run it).")
    ] = "state",
    keep_jobs: Annotated[
        bool | None,
        typer.Option(
            "--keep-jobs/--stop-jobs",
            help="On exit, leave the coordinator and jobs running for the next front door (default: keep when joined to a cluster).",
        ),
    ] = None,
    coordinator_resource: Annotated[
        list[str] | None,
        typer.Option(help="NAME=AMOUNT: a Ray resource the coordinator asks for, to pin it to the nodes that have it (repeatable)."),
    ] = None,
    admin_token_file: Annotated[
        str | None,
        typer.Option(
            help="File holding the admin token of a single tenant ('default'); every call then needs a token. "
            "Or set PARAMSERVER_ADMIN_TOKEN."
        ),
    ] = None,
    tenants: Annotated[
        str | None, typer.Option(help="JSON file of tenants: names, admin token SHA-256s (see `hash-token`) and quotas.")
    ] = None,
    tls_cert: Annotated[str | None, typer.Option(help="PEM certificate chain of every port (front door and shards): TLS on.")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        str | None, typer.Option(help="PEM CA that client certificates must be signed by (mutual TLS on every port).")
    ] = None,
    shard_port_range: Annotated[
        str | None,
        typer.Option(
            help="LOW-HIGH: the ports shard data ports bind on each node (e.g. 52000-52999), so Services and firewalls can name "
            "them; default: any free port."
        ),
    ] = None,
    placement: Annotated[
        str, typer.Option(help="How a job's shards go over the nodes: spread (round-robin over the nodes that can hold them) or pack.")
    ] = "spread",
    warm_shards: Annotated[
        int,
        typer.Option(
            min=0,
            help="Spare shard actors kept started (torch loaded) so that a lost shard's replacement and a new job's shards serve "
            "at once; they hold no CPU or GPU and serve jobs whose shards ask for none (the default). 0 = none.",
        ),
    ] = 2,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics of the front door, jobs and shards at http://HOST:PORT/metrics (0 = any free port)."),
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="Address the metrics endpoint binds (default: --host).")] = None,
    dashboard: Annotated[
        bool, typer.Option(help="Start the local Ray with its dashboard (needs the dashboard extra: pip install 'paramserver[dashboard]').")
    ] = False,
    log_level: Annotated[str, typer.Option(help="Log level: DEBUG, INFO, WARNING, ERROR.")] = "INFO",
    log_format: Annotated[
        str, typer.Option(help="text, or json (one object per line); the shards' and coordinator's records included.")
    ] = "text",
) -> None:
    """Start the service; stop it with SIGTERM or Ctrl-C."""
    from paramserver.log_format import configure
    from paramserver.server import ServiceConfig
    from paramserver.server import serve as run
    from paramserver.spread import POLICIES, PortRange

    try:
        configure(log_level, log_format)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if placement not in POLICIES:
        raise typer.BadParameter(f"{placement!r}: expected one of {', '.join(POLICIES)}", param_hint="--placement")
    try:
        ports = PortRange.parse(shard_port_range) if shard_port_range else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard-port-range") from None
    if dashboard and address is None and importlib.util.find_spec("aiohttp_cors") is None:
        raise typer.BadParameter("Ray's dashboard needs ray[default]: pip install 'paramserver[dashboard]'", param_hint="--dashboard")
    if address is None:  # a local Ray owned by this process: no token auth between its own parts
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    run(
        ServiceConfig(
            host=host,
            port=port,
            ray_address=address,
            num_cpus=num_cpus,
            shard_host=shard_host,
            grace_s=grace,
            snapshot_dir=snapshot_dir,
            spill_dir=spill_dir,
            shard_start_timeout_s=shard_start_timeout,
            name=name,
            state_dir=state_dir,
            keep_jobs_on_exit=keep_jobs,
            coordinator_resources=_resources(coordinator_resource or []),
            auth=_auth(admin_token_file, tenants),
            tls=_tls(tls_cert, tls_key, tls_client_ca),
            shard_port_range=ports,
            placement=placement,
            warm_shards=warm_shards,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            dashboard=dashboard,
        )
    )


def _auth(admin_token_file: str | None, tenants: str | None) -> AuthConfig | None:
    """The service's tenants from the options or $PARAMSERVER_ADMIN_TOKEN (a usage error when unusable)."""
    env = os.environ.get(ADMIN_TOKEN_ENV, "")
    given = [x for x in (admin_token_file, tenants, env) if x]
    if len(given) > 1:
        raise typer.BadParameter(f"give one of --admin-token-file, --tenants or ${ADMIN_TOKEN_ENV}")
    try:
        if tenants:
            return load_tenants(tenants)
        if admin_token_file:
            return AuthConfig.single(Path(admin_token_file).read_text().strip())
        if env:
            return AuthConfig.single(env.strip())
    except (OSError, ValueError, KeyError) as exc:
        raise typer.BadParameter(f"credentials: {exc}") from None
    return None


def _tls(cert: str | None, key: str | None, client_ca: str | None) -> TlsConfig | None:
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise typer.BadParameter("TLS needs both --tls-cert and --tls-key")
    try:
        return TlsConfig(cert, key, client_ca or "")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("hash-token")
def hash_token_command() -> None:
    """Read a token on stdin; print its SHA-256 (for the token_sha256 of a --tenants file)."""
    token = sys.stdin.readline().strip()
    if not token:
        raise typer.BadParameter("no token on stdin")
    print(hash_token(token))


def _resources(items: list[str]) -> dict[str, float]:
    """NAME=AMOUNT pairs as a dict (a bad one is a usage error naming it)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError(item)
            out[name] = float(amount)
        except ValueError:
            raise typer.BadParameter(f"{item!r}: expected NAME=AMOUNT, e.g. head=0.01", param_hint="--coordinator-resource") from None
    return out


@app.command()
def demo(
    steps: Annotated[int | None, typer.Option(help="Training steps (default 400; with --diloco 800).", show_default=False)] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    shards: Annotated[int, typer.Option(help="Shard actors.")] = 2,
    quick: Annotated[bool, typer.Option(help="A short run (40 steps).")] = False,
    address: Annotated[str | None, typer.Option(help="Use a running service instead of starting one.")] = None,
    diloco: Annotated[
        int | None,
        typer.Option(
            "--diloco",
            metavar="H",
            help="Instead: compare synchronous training with DiLoCo synchronising every H inner steps "
            "(same workers and batches; default steps then 800, --quick 100).",
        ),
    ] = None,
    compression: Annotated[str | None, typer.Option(help="With --diloco: compress the pushes (int8, int4 or topk).")] = None,
    pull: Annotated[str, typer.Option(help="With --diloco: how each round's result is pulled (fp32, bf16, int8 or int4).")] = "fp32",
    outer_momentum: Annotated[
        float,
        typer.Option(
            help="With --diloco: the momentum of the outer Nesterov SGD (lr 0.7; the paper's momentum 0.9 overshoots in so few rounds)."
        ),
    ] = 0.5,
) -> None:
    """Train a tiny transformer with 2 workers through the service and compare with local torch.optim
    (with --diloco H: compare synchronous training with DiLoCo)."""
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING)
    if diloco is not None:
        from paramserver.demo.diloco import DEFAULT_STEPS, QUICK_STEPS, outer_rule, run_diloco_demo

        if diloco < 1:
            raise typer.BadParameter("must be >= 1", param_hint="--diloco")
        if compression is not None and compression not in ("int8", "int4", "topk"):
            raise typer.BadParameter(f"{compression!r}: expected int8, int4 or topk", param_hint="--compression")
        n = QUICK_STEPS if quick else DEFAULT_STEPS if steps is None else steps
        if n % diloco:
            raise typer.BadParameter(f"the steps ({n}) must be a multiple of H ({diloco})", param_hint="--diloco")
        if pull not in ("fp32", "bf16", "int8", "int4"):
            raise typer.BadParameter(f"{pull!r}: expected fp32, bf16, int8 or int4", param_hint="--pull")
        run_diloco_demo(
            diloco, compression, steps=n, workers=workers, shards=shards, address=address, outer=outer_rule(outer_momentum), pull_dtype=pull
        )
        return
    for given, hint in (
        (compression is not None, "--compression"),
        (pull != "fp32", "--pull"),
        (outer_momentum != 0.5, "--outer-momentum"),
    ):
        if given:
            raise typer.BadParameter("only with --diloco", param_hint=hint)
    from paramserver.demo.run import run_demo

    run_demo(40 if quick else 400 if steps is None else steps, workers, shards, address=address)


snapshot_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and take snapshots.")
app.add_typer(snapshot_app, name="snapshot")

RootOpt = Annotated[str, typer.Option("--root", help="The service's snapshot store: a directory, or s3://bucket/prefix.")]


def _fail(err: Exception) -> None:
    from paramserver.errors import ParamServerError

    if isinstance(err, ParamServerError):
        typer.secho(f"{err.code} {err.reason}: {err.message}", fg="red", err=True)
        raise typer.Exit(2) from None
    raise err


@snapshot_app.command("list")
def snapshot_list(job_id: Annotated[str, typer.Argument(help="The job.")], root: RootOpt = "snapshots") -> None:
    """List a job's committed snapshots, oldest first (and any that lost their manifest)."""
    from rich.console import Console
    from rich.table import Table

    from paramserver.snapshot_stores import open_store

    store = open_store(root)
    table = Table("version", "applied", "shards", "bytes", "created (UTC)", "path")
    for ref in store.snapshots(job_id):
        try:
            s = store.read_manifest(ref).summary(store.path(ref))
        except Exception as exc:  # noqa: BLE001 - listed, marked unreadable
            table.add_row("?", "?", "?", "?", "?", f"{store.path(ref)} ({exc})")
            continue
        table.add_row(str(s["version"]), str(s["applied"]), str(s["shards"]), f"{s['bytes']:,}", s["created_at"], s["path"])
    for ref in store.quarantined(job_id):
        table.add_row("?", "?", "?", "?", "?", f"{store.path(ref)} (QUARANTINED: manifest lost)")
    Console().print(table)


@snapshot_app.command("show")
def snapshot_show(
    snapshot: Annotated[str, typer.Argument(help="A snapshot directory or URL, or JOB_ID[:latest].")], root: RootOpt = "snapshots"
) -> None:
    """Print a snapshot's manifest (job config, layout, files)."""
    from paramserver.snapshot_store import resolve
    from paramserver.snapshot_stores import open_store

    try:
        store = open_store(root)
        typer.echo(store.read_manifest(resolve(store, snapshot)).to_json().decode())
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@snapshot_app.command("verify")
def snapshot_verify(
    snapshot: Annotated[str, typer.Argument(help="A snapshot directory or URL, or JOB_ID[:latest].")], root: RootOpt = "snapshots"
) -> None:
    """Check every file's size, sha256 and format against the manifest, as a restore reads it
    (exit 2 on DATA_LOSS)."""
    from paramserver.snapshot_store import resolve, verify
    from paramserver.snapshot_stores import open_store

    try:
        store = open_store(root)
        ref = resolve(store, snapshot)
        manifest = verify(store, ref)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    typer.echo(f"ok: {store.path(ref)} (version {manifest.version}, {len(manifest.shards)} files verified)")


@snapshot_app.command("create")
def snapshot_create(
    job_id: Annotated[str, typer.Argument(help="The job.")],
    address: Annotated[str, typer.Option(help="The service.")] = "127.0.0.1:50051",
) -> None:
    """Ask a running service for a snapshot of a job and wait until it is durable."""
    from rich.console import Console

    from paramserver_client import JobClient, ServiceError

    with Console().status(f"snapshot of {job_id} ..."), JobClient(address, timeout=3600) as jobs:
        try:
            snap = jobs.create_snapshot(job_id)
        except ServiceError as err:
            typer.secho(str(err), fg="red", err=True)
            raise typer.Exit(2) from None
    typer.echo(f"{snap.path} (version {snap.version}, {snap.bytes:,} bytes)")


@app.command("export")
def export_cmd(
    snapshot: Annotated[str, typer.Argument(help="A snapshot directory or URL, or JOB_ID[:latest].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file.")],
    fmt: Annotated[str, typer.Option("--format", help="safetensors or torch.")] = "safetensors",
    point: Annotated[
        str, typer.Option("--point", help="eval (Schedule-Free's averaged x; the parameters for other rules) or train (y).")
    ] = "eval",
    root: RootOpt = "snapshots",
) -> None:
    """Write a snapshot's parameters under their original names and shapes."""
    from rich.progress import Progress

    from paramserver.export import export
    from paramserver.snapshot_store import resolve
    from paramserver.snapshot_stores import open_store

    try:
        store = open_store(root)
        ref = resolve(store, snapshot)
        total = store.read_manifest(ref).total_elements
        with Progress() as progress:
            task = progress.add_task("exporting", total=total)
            shapes = export(store, ref, out, fmt, lambda name, n: progress.update(task, advance=n, description=name), point=point)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    typer.echo(f"wrote {out}: {len(shapes)} tensors ({fmt})")


from paramserver.status_cli import jobs_command, status_command  # noqa: E402

app.command("jobs")(jobs_command)
app.command("status")(status_command)


def main() -> None:
    """Entry point of the ``paramserver`` script."""
    app()


if __name__ == "__main__":
    main()
