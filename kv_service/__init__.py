"""The KV service: content-addressed KV-cache blocks kept beyond one engine.

``kv_service.keys`` defines how a block is addressed and checked, ``kv_service.stores`` the
storage backends (memory, disk, Redis, and a tiered composition), ``kv_service.server`` the
gRPC service, and ``kv_service.client`` the client engines use. ``python -m kv_service``
runs the service.
"""
