#!/usr/bin/env python3
"""Health checks of the paramserver image: exit 0 when healthy, 1 when not (one line on stderr).

    python /opt/paramserver/healthcheck.py            # the front door (the image's HEALTHCHECK)
    python /opt/paramserver/healthcheck.py --raylet   # a Ray node: its raylet, through the dashboard agent

The front door check is grpc.health.v1 Health/Check of the service ``paramserver.v1.JobService``
(health passes authentication, so no token is needed). It speaks TLS when a CA is given, with a
client certificate for mutual TLS. Options fall back to the environment, for HEALTHCHECK and
exec probes: PARAMSERVER_HEALTH_ADDRESS (default 127.0.0.1:50051), PARAMSERVER_HEALTH_SERVICE,
PARAMSERVER_HEALTH_TIMEOUT (seconds, default 3), PARAMSERVER_HEALTH_CA, PARAMSERVER_HEALTH_CERT,
PARAMSERVER_HEALTH_KEY, PARAMSERVER_HEALTH_SERVER_NAME (the TLS name to expect, when the
certificate does not name the address).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

SERVICE = "paramserver.v1.JobService"
RAYLET_HEALTH = "http://127.0.0.1:{port}/api/local_raylet_healthz"


def check_front_door(
    address: str,
    service: str,
    timeout: float,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
) -> str | None:
    """None when `service` answers SERVING at `address`, else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes() if key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return f"{address} {service}: {err.code().name} {err.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address} {service}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def check_raylet(port: int, timeout: float) -> str | None:
    """None when the node's dashboard agent says its raylet is healthy, else why not."""
    url = RAYLET_HEALTH.format(port=port)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = reply.read(4096)
    except OSError as err:
        return f"{url}: {err}"
    return None if b"success" in body else f"{url}: {body[:200]!r}"


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=env("PARAMSERVER_HEALTH_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--service", default=env("PARAMSERVER_HEALTH_SERVICE", SERVICE))
    parser.add_argument("--timeout", type=float, default=float(env("PARAMSERVER_HEALTH_TIMEOUT", "3")))
    parser.add_argument("--ca", default=env("PARAMSERVER_HEALTH_CA"))
    parser.add_argument("--cert", default=env("PARAMSERVER_HEALTH_CERT"))
    parser.add_argument("--key", default=env("PARAMSERVER_HEALTH_KEY"))
    parser.add_argument("--server-name", default=env("PARAMSERVER_HEALTH_SERVER_NAME"))
    parser.add_argument("--raylet", action="store_true", help="check the local Ray node instead of the front door")
    parser.add_argument("--raylet-port", type=int, default=52365, help="the dashboard agent port (--dashboard-agent-listen-port)")
    args = parser.parse_args(argv)
    if args.raylet:
        problem = check_raylet(args.raylet_port, args.timeout)
    else:
        problem = check_front_door(args.address, args.service, args.timeout, args.ca, args.cert, args.key, args.server_name)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
