"""The gateway's OpenAPI document, served at ``/openapi.json`` (and rendered at ``/docs``).

Request schemas are the pydantic models the routes validate with, so the document states
exactly what is accepted. Each route lists its error statuses with its own API's error body
(OpenAI's or Anthropic's). With API keys configured, the ``/v1`` routes declare the two ways
of presenting one: ``Authorization: Bearer`` and ``x-api-key``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

# Statuses every generation route may answer with, and why.
GENERATION_ERRORS = {
    400: "the request is invalid (named by `param` where OpenAI names one)",
    401: "no accepted API key",
    404: "the model does not exist",
    429: "over the gateway's or the replicas' bounds; retry after `Retry-After` seconds",
    503: "no engine replica is ready or reachable; retry after `Retry-After` seconds",
}


def error_responses(model: type, statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for ``statuses``, each with the error body ``model``."""
    return {status: {"model": model, "description": why} for status, why in statuses.items()}


def install_openapi(app: FastAPI, *, served_model_name: str, with_api_keys: bool) -> None:
    """Makes ``app.openapi()`` return the document, built once on first request. ``model``
    fields and parameters list the one model served: another name is answered 404."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            description="OpenAI-compatible and Anthropic Messages APIs of a Switchyard fleet.",
            routes=app.routes,
        )
        _name_the_served_model(document, served_model_name)
        if with_api_keys:
            components = document.setdefault("components", {})
            components["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            }
            for path, operations in document.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}, {"x-api-key": []}]
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _name_the_served_model(document: dict[str, Any], served_model_name: str) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for schema in schemas.values():
        model = schema.get("properties", {}).get("model")
        if (
            model is not None
            and model.get("type") == "string"
            and "model" in schema.get("required", ())
        ):
            model["enum"] = [served_model_name]
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", ()):
                if parameter.get("name") == "model_id":
                    parameter["schema"] = {"type": "string", "enum": [served_model_name]}
