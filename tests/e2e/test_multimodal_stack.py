"""``switchyard up`` on a vision-language checkpoint: images through the whole stack.

A tiny random LLaVA checkpoint (CLIP tower, projector, Llama) served by the real processes
(controller, engine, gateway), driven by the official ``openai`` and ``anthropic`` clients
with images as data URLs and base64 blocks. Cache reuse and metrics are checked in detail
against one engine in ``tests/gateway/test_multimodal_e2e.py``; here the stack must carry the
pixels end to end and keep images apart.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.e2e.stack import API_KEY, MODEL_NAME, Stack, start_stack, stop_stack
from tests.multimodal_support import make_llava_checkpoint, random_image

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


def png_base64(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, 56, 56).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def ask(seed: int, text: str = "What is in the picture?") -> list[dict[str, Any]]:
    url = f"data:image/png;base64,{png_base64(seed)}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def vlm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("vlm-stack")
    checkpoint = make_llava_checkpoint(work / "llava", text={"max_position_embeddings": 4096})
    started = start_stack(checkpoint, work, engines=1)
    yield started
    stop_stack(started)


def chat(stack: Stack, messages: list[dict[str, Any]]) -> str:
    client = openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens > 16  # the image's 16 placeholder tokens are in the prompt
    return reply.choices[0].message.content or ""


def test_openai_image_requests_answer_and_images_are_kept_apart(vlm_stack: Stack) -> None:
    first = chat(vlm_stack, ask(1))
    assert first
    assert chat(vlm_stack, ask(1)) == first  # the same image again (served from cache)
    assert chat(vlm_stack, ask(2)) != first  # the same text with another image


def test_anthropic_image_blocks_answer_like_openai_parts(vlm_stack: Stack) -> None:
    claude = anthropic.Anthropic(
        base_url=vlm_stack.url, api_key=API_KEY, max_retries=0, timeout=120
    )
    reply = claude.messages.create(
        model=MODEL_NAME,
        max_tokens=6,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": png_base64(3),
                        },
                    },
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
    )
    assert reply.content[0].text
    assert reply.usage.input_tokens > 16


def test_a_broken_image_is_a_400_and_the_stack_keeps_serving(vlm_stack: Stack) -> None:
    client = openai.OpenAI(base_url=vlm_stack.base_url, api_key=API_KEY, max_retries=0)
    broken = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=broken, max_tokens=4)
    assert "image" in str(error.value).lower()
    assert chat(vlm_stack, ask(4))
