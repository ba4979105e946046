"""paramserver: optimizer-as-a-service.

The fp32 parameters and optimizer state of a model live in shard actors on a
Ray cluster; training workers push gradients and pull parameters over gRPC.

This top-level package is import-light on purpose: workers import the
generated stubs (``paramserver.v1``) through the client library
(``paramserver_client``) without pulling in Ray or torch. The service lives
in the submodules (``paramserver.server``, ``paramserver.cli`` ...).
"""

__version__ = "0.1.0"
