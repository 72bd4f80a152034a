"""Generated protobuf and gRPC stubs; run ``python -m switchyard.protogen`` to refresh."""
