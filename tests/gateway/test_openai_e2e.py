"""The OpenAI API end to end: the official ``openai`` client against the gateway served by
uvicorn, routing to the real engine service (in-process, on a small random checkpoint)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from engine_service.server import EngineServer
from gateway.route_sources import StaticRoutes
from switchyard.v1 import engine_pb2, engine_pb2_grpc
from tests.gateway.conftest import MODEL_NAME, BackgroundLoop, ServedApp, serve_gateway

MESSAGES = [{"role": "user", "content": "Tell me a story about the sea 🌊"}]
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def gateway(
    background: BackgroundLoop, checkpoint: Path, engine: EngineServer
) -> Iterator[ServedApp]:
    served = serve_gateway(background, checkpoint, StaticRoutes([f"127.0.0.1:{engine.port}"]))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(gateway: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)


def engine_stats(engine: EngineServer) -> engine_pb2.GetStatsResponse:
    with grpc.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
        return engine_pb2_grpc.EngineServiceStub(channel).GetStats(
            engine_pb2.GetStatsRequest(), timeout=5
        )


def sse_payloads(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a raw event stream, checking the framing on the way."""
    body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1])
    return [event.removeprefix("data: ") for event in events[:-1]]


def test_health_is_ok_with_a_ready_engine(gateway: ServedApp) -> None:
    assert httpx.get(f"{gateway.base_url}/health").status_code == 200


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL_NAME]


def test_chat_usage_matches_the_tokenizer(
    client: openai.OpenAI, tokenizer: PreTrainedTokenizerBase
) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, **GREEDY
    )
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == len(prompt_ids) + 8
    choice = completion.choices[0]
    assert (choice.finish_reason, choice.message.role) == ("length", "assistant")
    assert choice.message.content


def test_chat_stream_is_framed_like_openai(gateway: ServedApp, client: openai.OpenAI) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = chunks[-2]["choices"][0]
    assert (finish["delta"], finish["finish_reason"]) == ({}, "length")
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks[1:-1])
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, **GREEDY
    )
    assert streamed == whole.choices[0].message.content


def test_stream_without_include_usage_has_no_usage_field(gateway: ServedApp) -> None:
    body = {"model": MODEL_NAME, "prompt": "The sea", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{gateway.base_url}/v1/completions", json=body, timeout=60
    ) as response:
        payloads = sse_payloads(response)
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_truncates_output_and_finishes_with_stop(client: openai.OpenAI) -> None:
    free = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, **GREEDY
    )
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    for stream in (False, True):
        if stream:
            chunks = list(
                client.completions.create(
                    model=MODEL_NAME,
                    prompt="Once upon a time",
                    max_tokens=24,
                    stop=[stop],
                    stream=True,
                    **GREEDY,
                )
            )
            output = "".join(choice.text for chunk in chunks for choice in chunk.choices)
            finish_reason = chunks[-1].choices[0].finish_reason
        else:
            stopped = client.completions.create(
                model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, stop=stop, **GREEDY
            )
            output, finish_reason = stopped.choices[0].text, stopped.choices[0].finish_reason
        assert output == text[:cut]
        assert finish_reason == "stop"


def test_completion_logprobs_line_up_with_tokens(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL_NAME, prompt="The quick brown", max_tokens=6, logprobs=2, **GREEDY
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert (
        logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    )
    assert completion.usage is not None
    assert (
        len(logprobs.tokens)
        == len(logprobs.token_logprobs or [])
        == completion.usage.completion_tokens
        == 6
    )
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset or [])
    # Greedy: the sampled token is the most likely one.
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs or [], logprobs.top_logprobs
    ):
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)
        assert token in top


def test_chat_logprobs_carry_token_bytes(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    raw = b"".join(bytes(entry.bytes or []) for entry in content)
    assert raw.decode("utf-8", errors="replace") == completion.choices[0].message.content
    assert all(len(entry.top_logprobs) == 3 for entry in content)


def test_n_samples_come_back_as_separate_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=4,
        n=3,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2]
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_client_disconnect_cancels_the_engine_request(
    gateway: ServedApp, engine: EngineServer
) -> None:
    max_tokens = 240
    before = engine_stats(engine).load.generation_tokens_total
    body = {
        "model": MODEL_NAME,
        "prompt": "A long story",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{gateway.base_url}/v1/completions", json=body, timeout=60
    ) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while True:
        stats = engine_stats(engine)
        if stats.load.num_running == 0 and stats.num_blocks_free == stats.num_blocks_total:
            break
        assert time.monotonic() < deadline, "the engine kept the request after the client left"
        time.sleep(0.02)
    generated = stats.load.generation_tokens_total - before
    assert generated < max_tokens / 2, f"the engine generated {generated} of {max_tokens} tokens"


def test_metrics_count_requests_and_time_to_first_token(
    gateway: ServedApp, client: openai.OpenAI
) -> None:
    client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    text = httpx.get(f"{gateway.base_url}/metrics").text
    assert 'switchyard_gateway_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert (
        'switchyard_gateway_time_to_first_token_seconds_count{endpoint="/v1/completions"}' in text
    )
    assert "switchyard_gateway_in_flight_requests" in text
