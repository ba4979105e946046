"""Generated protobuf and gRPC stubs for paramserver.v1 (do not edit)."""
