"""Structured output through the engine service: ``GenerateRequest.structured`` is enforced,
a bad constraint is INVALID_ARGUMENT, and jump-forward shows in /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import jsonschema
import pytest
import transformers

from engine_service.server import EngineServer
from switchyard.demo import make_test_checkpoint
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.engine_service.test_server import BackgroundLoop, engine_settings

SCHEMA = {
    "type": "object",
    "properties": {
        "status_of_the_order": {"enum": ["shipped", "delivered"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["status_of_the_order", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("structured-server") / "tiny-llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[EngineServer]:
    background = BackgroundLoop()
    server = EngineServer(engine_settings(checkpoint, ""))
    background.run(server.start())
    yield server
    background.run(server.stop(grace_s=1))
    background.close()


@pytest.fixture(scope="module")
def stub(server: EngineServer) -> Iterator[engine_pb2_grpc.EngineServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def generate_text(
    stub: engine_pb2_grpc.EngineServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
    structured: common_pb2.StructuredOutput,
) -> tuple[str, str]:
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=tokenizer.encode("Answer:", add_special_tokens=False),
        sampling=common_pb2.SamplingParams(temperature=1.0, seed=7, max_tokens=200),
        structured=structured,
    )
    responses = list(stub.Generate(request, timeout=60))
    ids = [t for r in responses for t in r.token_ids]
    return tokenizer.decode(ids, skip_special_tokens=True), responses[-1].finish_reason


@pytest.mark.parametrize("backend", ["", "llguidance", "xgrammar"])
def test_json_schema_over_the_wire_validates(
    stub: engine_pb2_grpc.EngineServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
    backend: str,
) -> None:
    structured = common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA), backend=backend)
    text, finish_reason = generate_text(stub, tokenizer, structured)
    assert finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_over_the_wire_fullmatches(
    stub: engine_pb2_grpc.EngineServiceStub, tokenizer: transformers.PreTrainedTokenizerBase
) -> None:
    text, _ = generate_text(stub, tokenizer, common_pb2.StructuredOutput(regex=r"[A-Z]{2}\d{3}"))
    assert re.fullmatch(r"[A-Z]{2}\d{3}", text)


@pytest.mark.parametrize(
    ("structured", "problem"),
    [
        (common_pb2.StructuredOutput(json_schema='{"type": "thing"}'), "thing"),
        (common_pb2.StructuredOutput(regex="(unclosed"), "regex"),
        (common_pb2.StructuredOutput(regex="a", backend="outlines"), "outlines"),
        (common_pb2.StructuredOutput(json_object=False), "json_object"),
    ],
)
def test_bad_constraint_is_invalid_argument(
    stub: engine_pb2_grpc.EngineServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
    structured: common_pb2.StructuredOutput,
    problem: str,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        generate_text(stub, tokenizer, structured)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (raised.value.details() or "")


def test_jump_forward_tokens_are_a_metric(
    server: EngineServer,
    stub: engine_pb2_grpc.EngineServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    generate_text(stub, tokenizer, common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA)))
    body = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).text
    match = re.search(r"^switchyard:jump_forward_tokens_total\{[^}]*\} (\S+)$", body, re.M)
    assert match is not None and float(match.group(1)) > 0
