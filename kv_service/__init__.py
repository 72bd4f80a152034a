"""The KV service: content-addressed KV-cache blocks kept beyond one engine.

``kv_service.keys`` defines how a block is addressed and checked, ``kv_service.stores`` the
storage backends (memory, disk, Redis, and a tiered composition), ``kv_service.server`` the
gRPC service. Its one client, which engines, tools and tests use, is
:mod:`switchyard.kv_client`. ``python -m kv_service`` runs the service.
"""
