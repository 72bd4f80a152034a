"""The gateway: Switchyard's only HTTP face.

It authenticates, parses OpenAI-shaped requests, renders chat templates and tokenizes,
routes token ids to an engine replica over gRPC, detokenizes the streamed tokens and
answers in the client's own format. ``create_app`` in :mod:`gateway.app` builds it.
"""
