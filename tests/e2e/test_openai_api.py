"""The whole stack (``switchyard up``: controller, one engine, gateway) through the official
``openai`` client: results match ``transformers`` on the same checkpoint, every bad input gets
OpenAI's error JSON, and the stack keeps serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tests.e2e.stack import API_KEY, MAX_MODEL_LEN, MODEL_NAME, Stack, engine_stats, ready_replicas

MESSAGES = [{"role": "user", "content": "Tell me about the railway yard."}]
PROMPT = "The switchyard at dawn"


class Reference:
    """``transformers`` greedy decoding on the checkpoint the stack serves."""

    def __init__(self, checkpoint: Path) -> None:
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def prompt_ids(self, prompt: str) -> list[int]:
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        generated = out[0, len(prompt_ids) :].tolist()
        eos = set(self.model.generation_config.eos_token_id or [])
        for position, token in enumerate(generated):
            if token in eos:
                return generated[:position]  # the API leaves the stop token out
        return generated

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Reference:
    return Reference(checkpoint)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def post(stack: Stack, path: str, body: Any, key: str = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{stack.url}{path}", content=body, headers=headers, timeout=60)
    return httpx.post(f"{stack.url}{path}", json=body, headers=headers, timeout=60)


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **overrides}


# -- results ---------------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_greedy_chat_matches_transformers(client: openai.OpenAI, reference: Reference) -> None:
    expected = reference.greedy(reference.chat_ids(MESSAGES), 24)
    assert len(expected) >= 8, "the checkpoint stops too soon for a meaningful comparison"
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.content == reference.text(expected)
    assert choice.finish_reason == ("length" if len(expected) == 24 else "stop")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(reference.chat_ids(MESSAGES))
    assert reply.usage.completion_tokens == len(expected) + (len(expected) < 24)


def test_greedy_completion_matches_transformers(
    client: openai.OpenAI, reference: Reference
) -> None:
    prompt_ids = reference.prompt_ids(PROMPT)
    expected = reference.greedy(prompt_ids, 24)
    assert len(expected) >= 8, "the checkpoint stops too soon for a meaningful comparison"
    reply = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert reply.choices[0].text == reference.text(expected)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt_ids)


def test_streamed_chat_equals_the_unstreamed_one(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.model_dump() == whole.usage.model_dump()


def test_streamed_completion_equals_the_unstreamed_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stream=True
    )
    text = "".join(choice.text for chunk in stream for choice in chunk.choices)
    assert text == whole.choices[0].text


def test_n_2_returns_two_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, n=2, temperature=1.0, seed=7,
        logprobs=True,
    )  # fmt: skip
    assert sorted(c.index for c in reply.choices) == [0, 1]
    generated = [len(c.logprobs.content or []) for c in reply.choices if c.logprobs]
    assert len(generated) == 2 and all(1 <= g <= 8 for g in generated)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(generated)


def test_n_2_streams_both_choices(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, stream=True
    )
    finished = {c.index for chunk in stream for c in chunk.choices if c.finish_reason}
    assert finished == {0, 1}


def test_stop_string_cuts_the_text_and_finishes_with_stop(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=32, temperature=0)
    text = full.choices[0].text
    candidates = [
        text[i : i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3]
    ]
    assert candidates, f"no usable stop string in {text!r}"
    stop = candidates[0]
    cut = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_are_consistent_with_greedy(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob <= 0.0
        assert token.logprob == pytest.approx(max(t.logprob for t in token.top_logprobs), abs=1e-4)


def test_completion_logprobs_cover_every_token(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert reply.usage is not None
    assert (
        len(logprobs.tokens) == len(logprobs.token_logprobs or []) == reply.usage.completion_tokens
    )
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])


def test_32_concurrent_streams_complete_correctly(stack: Stack, client: openai.OpenAI) -> None:
    prompts = [f"{PROMPT} number {i}" for i in range(4)]
    expected = {
        p: client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=12, temperature=0)
        .choices[0]
        .text
        for p in prompts
    }

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str]:
        stream = await aclient.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        return prompt, "".join([c.text async for chunk in stream for c in chunk.choices])

    async def everyone() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(
            base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=300
        ) as aclient:
            return await asyncio.gather(*(one(aclient, prompts[i % 4]) for i in range(32)))

    results = asyncio.run(everyone())
    assert len(results) == 32
    for prompt, text in results:
        assert text == expected[prompt]


def test_client_abort_frees_the_kv_blocks(stack: Stack) -> None:
    [address] = ready_replicas(stack).values()
    before = engine_stats(address)
    max_tokens = MAX_MODEL_LEN - 32
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{stack.url}/v1/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        during = engine_stats(address)
    # The connection is closed: the gateway must abort the request on the engine.
    deadline = time.monotonic() + 20
    while True:
        after = engine_stats(address)
        if after.load.num_running == 0 and after.num_blocks_free == after.num_blocks_total:
            break
        assert time.monotonic() < deadline, f"blocks not freed: {after}"
        time.sleep(0.1)
    assert during.num_blocks_free < during.num_blocks_total  # it did hold blocks
    generated = after.load.generation_tokens_total - before.load.generation_tokens_total
    assert generated < max_tokens, "the request ran to its end: it was not aborted"


# -- errors ----------------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"type", "param", "code"} <= set(error)
    return error


BAD_BODIES = {
    "missing messages": ({"model": MODEL_NAME}, 400),
    "empty messages": (chat_body(messages=[]), 400),
    "max_tokens zero": (chat_body(max_tokens=0), 400),
    "max_tokens negative": (chat_body(max_tokens=-5), 400),
    "temperature too high": (chat_body(temperature=2.5), 400),
    "temperature negative": (chat_body(temperature=-0.1), 400),
    "unknown model": (chat_body(model="no-such-model"), 404),
    "n too large": (chat_body(n=1000), 400),
    "beyond the context": (chat_body(max_tokens=MAX_MODEL_LEN), 400),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_bad_chat_request_gets_an_openai_error(stack: Stack, case: str) -> None:
    body, status = BAD_BODIES[case]
    assert_openai_error(post(stack, "/v1/chat/completions", body), status)


def test_long_prompt_beyond_the_context_is_400(stack: Stack) -> None:
    body = {"model": MODEL_NAME, "prompt": "railway " * MAX_MODEL_LEN, "max_tokens": 8}
    error = assert_openai_error(post(stack, "/v1/completions", body), 400)
    assert error["code"] == "context_length_exceeded"


def test_invalid_json_is_400(stack: Stack) -> None:
    assert_openai_error(post(stack, "/v1/chat/completions", b'{"model": "tiny", "mess'), 400)


def test_bad_key_is_401(stack: Stack) -> None:
    assert_openai_error(post(stack, "/v1/chat/completions", chat_body(), key="wrong"), 401)


def test_missing_key_is_401(stack: Stack) -> None:
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=chat_body(), timeout=30)
    assert_openai_error(response, 401)


def test_openai_client_raises_typed_errors(stack: Stack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=0)
    bad_key = openai.OpenAI(base_url=stack.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)


def test_stack_keeps_serving_after_bad_requests(stack: Stack, client: openai.OpenAI) -> None:
    for body, _ in BAD_BODIES.values():
        post(stack, "/v1/chat/completions", body)
    post(stack, "/v1/chat/completions", b"not json")
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(f"{stack.url}/health", timeout=10).status_code == 200
