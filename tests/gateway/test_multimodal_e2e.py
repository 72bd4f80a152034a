"""Images end to end: the official ``openai`` and ``anthropic`` clients against the gateway,
routing to the real engine service on a small random LLaVA checkpoint. Image requests
answer; the same text with another image shares no image block; a repeated image hits the
prefix cache and, behind other text, the encoder cache; bad images are 400s in each API's
own error format."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import grpc
import httpx
import openai
import pytest

from engine_service.server import EngineServer
from gateway.route_sources import StaticRoutes
from switchyard.v1 import engine_pb2, engine_pb2_grpc
from tests.gateway.conftest import (
    MODEL_NAME,
    BackgroundLoop,
    ServedApp,
    serve_gateway,
    start_engine,
)
from tests.multimodal_support import make_llava_checkpoint, random_image

BLOCK = 4
MAX_IMAGE_BYTES = 64 << 10
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


def png(seed: int, size: int = 56) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, size, size).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts: dict[str, Any] | str) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llava_checkpoint(tmp_path_factory.mktemp("llava") / "ckpt")


@pytest.fixture(scope="module")
def vlm_engine(vlm_checkpoint: Path, background: BackgroundLoop) -> Iterator[EngineServer]:
    server = start_engine(
        background, vlm_checkpoint, num_kv_blocks=256, block_size=BLOCK, max_model_len=None
    )
    yield server
    background.run(server.stop(grace_s=1))


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A local HTTP server with one PNG at /cat.png (and a text file at /notes.txt)."""
    files = {"/cat.png": png(40), "/notes.txt": b"not an image"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def gateway(
    background: BackgroundLoop, vlm_checkpoint: Path, vlm_engine: EngineServer
) -> Iterator[ServedApp]:
    served = serve_gateway(
        background,
        vlm_checkpoint,
        StaticRoutes([f"127.0.0.1:{vlm_engine.port}"]),
        limit_mm_per_prompt={"image": 2},
        max_image_bytes=MAX_IMAGE_BYTES,
        enable_media_url_fetch=True,
        allowed_media_domains=["127.0.0.1"],
        media_fetch_timeout_s=5,
    )
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(gateway: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(gateway: ServedApp) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key="unused", max_retries=0)


def load(engine: EngineServer) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        return stub.GetStats(engine_pb2.GetStatsRequest(), timeout=5).load


def engine_metric(engine: EngineServer, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{engine.metrics_port}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the engine's metrics")


def chat(client: openai.OpenAI, messages: list[dict[str, Any]]) -> str:
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    assert reply.choices[0].finish_reason == "length"
    return reply.choices[0].message.content or ""


def test_same_text_with_another_image_answers_differently_and_shares_no_image_block(
    client: openai.OpenAI, vlm_engine: EngineServer
) -> None:
    question = ask("Look at this:", image_part(data_url(png(1))), "What is it?")
    first = chat(client, question)
    hits_before = load(vlm_engine).prefix_cache_hits
    other = chat(client, ask("Look at this:", image_part(data_url(png(2))), "What is it?"))
    shared = load(vlm_engine).prefix_cache_hits - hits_before
    assert other != first
    # Only the blocks before the image were reused ("<bos>USER: Look at this:" is short).
    assert shared < 16


def test_the_same_image_hits_the_prefix_cache_and_then_the_encoder_cache(
    client: openai.OpenAI, vlm_engine: EngineServer
) -> None:
    image = image_part(data_url(png(3)))
    first = chat(client, ask("Describe", image))
    prefix_hits = engine_metric(vlm_engine, "vllm:prefix_cache_hits_total")
    encoder_hits = engine_metric(vlm_engine, "vllm:mm_cache_hits_total")
    again = chat(client, ask("Describe", image))
    assert again == first
    # The whole image's KV came from the prefix cache: the encoder was not even asked.
    assert engine_metric(vlm_engine, "vllm:prefix_cache_hits_total") - prefix_hits >= 16
    assert engine_metric(vlm_engine, "vllm:mm_cache_hits_total") == encoder_hits
    # Behind other text the KV differs, but the image's encoder output is reused.
    encoded = engine_metric(vlm_engine, "switchyard:mm_encoder_images_total")
    chat(client, ask("Something else first. Describe", image))
    assert engine_metric(vlm_engine, "vllm:mm_cache_hits_total") == encoder_hits + 1
    assert engine_metric(vlm_engine, "switchyard:mm_encoder_images_total") == encoded


def test_two_images_in_one_message_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=ask(image_part(data_url(png(4))), "and", image_part(data_url(png(5)))),
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    # Two images of 16 placeholder tokens each are in the prompt.
    assert chunks[-1].usage.prompt_tokens > 32
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_an_image_url_is_fetched_from_an_allowed_host(
    client: openai.OpenAI, image_host: str
) -> None:
    fetched = chat(client, ask("Describe", image_part(f"{image_host}/cat.png")))
    inline = chat(client, ask("Describe", image_part(data_url(png(40)))))
    assert fetched == inline


def test_anthropic_image_blocks_answer(claude: anthropic.Anthropic, client: openai.OpenAI) -> None:
    def message(seed: int) -> str:
        reply = claude.messages.create(
            model=MODEL_NAME,
            max_tokens=6,
            extra_body={"temperature": 0},
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": base64.b64encode(png(seed)).decode(),
                            },
                        },
                        {"type": "text", "text": "What is in the picture?"},
                    ],
                }
            ],
        )
        return "".join(block.text for block in reply.content if block.type == "text")

    first, other = message(6), message(7)
    assert first and first != other
    # The same image through the OpenAI API renders the same prompt, so the same answer.
    assert chat(client, ask(image_part(data_url(png(6))), "What is in the picture?")) == first


# -- bad input ------------------------------------------------------------------------------


BAD_IMAGES = {
    "broken base64": (data_url(b"") + "%%%not-base64", "not valid base64"),
    "not an image": (data_url(b"just some text, not pixels", "image/png"), "not an image"),
    "over the size limit": (data_url(b"\x89PNG" + bytes(MAX_IMAGE_BYTES)), "at most"),
    "a scheme not served": ("file:///etc/passwd", "data: or http(s)"),
    "a host not allowed": ("http://example.com/cat.png", "not allowed"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_400_in_openai_format_naming_the_part(
    client: openai.OpenAI, case: str
) -> None:
    url, reason = BAD_IMAGES[case]
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, ask("What is it?", image_part(url)))
    error = caught.value.body
    assert reason in error["message"]
    assert error["param"] == "messages.0.content.1.image_url"


def test_a_fetched_file_that_is_no_image_is_400(client: openai.OpenAI, image_host: str) -> None:
    with pytest.raises(openai.BadRequestError, match="not an image"):
        chat(client, ask(image_part(f"{image_host}/notes.txt")))


def test_too_many_images_are_400(client: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    three = [image_part(data_url(png(seed))) for seed in range(3)]
    with pytest.raises(openai.BadRequestError, match="at most 2 are allowed"):
        chat(client, ask(*three, "Compare them."))
    block = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": ""},
    }
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": [block] * 3}]
        )
    assert caught.value.body["type"] == "error"
    assert "at most 2 are allowed" in caught.value.body["error"]["message"]


def test_anthropic_broken_base64_is_400_in_anthropic_format(claude: anthropic.Anthropic) -> None:
    block = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "@@@"},
    }
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": [block]}]
        )
    body = caught.value.body
    assert body["error"]["type"] == "invalid_request_error"
    assert "not valid base64" in body["error"]["message"]


def test_an_image_for_a_text_only_model_is_400(
    background: BackgroundLoop, checkpoint: Path
) -> None:
    """Refused before any engine is asked (the route points nowhere)."""
    served = serve_gateway(background, checkpoint, StaticRoutes(["127.0.0.1:9"]))
    try:
        text_client = openai.OpenAI(
            base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0
        )
        with pytest.raises(openai.BadRequestError, match="does not accept images"):
            chat(text_client, ask("What is it?", image_part(data_url(png(1)))))
        text_claude = anthropic.Anthropic(base_url=served.base_url, api_key="unused", max_retries=0)
        block = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
        }
        with pytest.raises(anthropic.BadRequestError, match="does not accept images"):
            text_claude.messages.create(
                model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": [block]}]
            )
    finally:
        served.close()
