"""The tool service: built-in tools (``python``, ``file_search``) and the tools of external
MCP servers, served over gRPC (``proto/switchyard/v1/tool.proto``)."""
