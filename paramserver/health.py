"""grpc.health.v1 and server reflection for a port, listing only the services it serves.

Reflection is served as ``grpc.reflection.v1.ServerReflection`` (what grpcurl and current
clients ask for first) and as the older ``grpc.reflection.v1alpha.ServerReflection``. The
installed grpcio-reflection implements only v1alpha, whose messages are the same on the wire; the
v1 service is that implementation registered under the v1 name, with the v1 file descriptor
(derived from v1alpha's, renamed) in the descriptor pool so that reflection can describe itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1ALPHA = reflection.SERVICE_NAME
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    """Put grpc.reflection.v1's file descriptor in the default pool (once)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old, new = "grpc.reflection.v1alpha", "grpc.reflection.v1"
    fdp.name, fdp.package = _V1_FILE, new
    for msg in fdp.message_type:
        for f in msg.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(f".{old}.", f".{new}.")
    for svc in fdp.service:
        for m in svc.method:
            m.input_type = m.input_type.replace(f".{old}.", f".{new}.")
            m.output_type = m.output_type.replace(f".{old}.", f".{new}.")
    pool.Add(fdp)


def add_health_and_reflection(server: aio.Server, services: Sequence[str]) -> Any:
    """Serve health (NOT_SERVING until set_serving) and reflection of `services` plus health and
    reflection themselves; returns the health servicer."""
    _register_v1_descriptor()
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = (*services, HEALTH_NAME, REFLECTION_V1, REFLECTION_V1ALPHA)
    impl = reflection_aio.ReflectionServicer(names)
    for service in (REFLECTION_V1, REFLECTION_V1ALPHA):
        handler = grpc.stream_stream_rpc_method_handler(
            impl.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))
    return servicer


async def set_serving(servicer: Any, services: Sequence[str], serving: bool) -> None:
    """Report `services` (and the server as a whole, "") SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in (*services, ""):
        await servicer.set(name, status)
