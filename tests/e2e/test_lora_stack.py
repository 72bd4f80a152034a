"""Multi-LoRA through ``switchyard up``, driven by the official ``openai`` and ``anthropic``
clients: adapters from ``--lora-modules`` and loaded at runtime answer like ``transformers``
with the adapter merged; ``/v1/models`` lists them; unknown names are 404s; loading needs
the admin key, refuses bad adapters with the reason, and loses no request in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import torch

from tests.e2e.stack import API_KEY, MODEL_NAME, Stack, start_stack, stop_stack
from tests.lora_support import greedy_reference, make_peft_adapter, merged_model

ADMIN_KEY = "e2e-admin"
PROMPT = [5, 17, 42, 99, 123, 7, 300, 11]
MAX_NEW = 8


@pytest.fixture(scope="module")
def adapters(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """({name: folder}, {None or name: reference model})."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    folders = {
        "sql": make_peft_adapter(
            base, root / "sql", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        ),
        "chat": make_peft_adapter(
            base, root / "chat", 2, r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"]
        ),
        "huge": make_peft_adapter(base, root / "huge", 3, r=32, target_modules=["q_proj"]),
    }
    models = {None: base, "sql": merged_model(base, folders["sql"])}
    models["chat"] = merged_model(base, folders["chat"])
    return folders, models


@pytest.fixture(scope="module")
def lora_stack(
    checkpoint: Path, adapters, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folders, _ = adapters
    started = start_stack(
        checkpoint,
        tmp_path_factory.mktemp("lora-stack"),
        engines=1,
        extra_args=[
            "--enable-lora", "--lora-modules", f"sql={folders['sql']}",
            "--max-loras", "2", "--max-lora-rank", "8", "--admin-key", ADMIN_KEY,
        ],
    )  # fmt: skip
    yield started
    stop_stack(started)


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def _answer(stack: Stack, model: str) -> str:
    reply = _client(stack).completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0.0
    )
    assert reply.model == model
    return reply.choices[0].text


def _expected_text(checkpoint: Path, model) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.decode(greedy_reference(model, PROMPT, MAX_NEW))


def _admin(stack: Stack, path: str, body: dict, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def test_an_adapter_and_the_base_answer_like_transformers(lora_stack, adapters, checkpoint):
    _, models = adapters
    assert _expected_text(checkpoint, models["sql"]) != _expected_text(checkpoint, models[None])
    assert _answer(lora_stack, "sql") == _expected_text(checkpoint, models["sql"])
    assert _answer(lora_stack, f"{MODEL_NAME}:sql") == _expected_text(checkpoint, models["sql"])
    assert _answer(lora_stack, MODEL_NAME) == _expected_text(checkpoint, models[None])


def test_models_lists_adapters_with_parent_and_root(lora_stack, adapters):
    folders, _ = adapters
    cards = {m.id: m for m in _client(lora_stack).models.list().data}
    assert set(cards) >= {MODEL_NAME, "sql"}
    assert cards["sql"].parent == MODEL_NAME
    assert cards["sql"].root == str(folders["sql"])
    one = _client(lora_stack).models.retrieve("sql")
    assert one.id == "sql" and one.parent == MODEL_NAME


def test_unknown_models_are_404s_in_each_clients_format(lora_stack):
    with pytest.raises(openai.NotFoundError):
        _client(lora_stack).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    claude = anthropic.Anthropic(base_url=lora_stack.url, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(
            model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    reply = claude.messages.create(
        model="sql", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.model == "sql"


def test_runtime_load_and_unload_need_the_admin_key_refuse_bad_adapters_and_lose_nothing(
    lora_stack, adapters, checkpoint
):
    folders, models = adapters
    body = {"lora_name": "chat", "lora_path": str(folders["chat"])}
    assert _admin(lora_stack, "load_lora_adapter", body, key=API_KEY).status_code == 403
    bad = _admin(
        lora_stack, "load_lora_adapter", {"lora_name": "huge", "lora_path": str(folders["huge"])}
    )
    assert bad.status_code == 400 and "max-lora-rank" in bad.json()["error"]["message"]
    missing = _admin(lora_stack, "load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such"})
    assert missing.status_code == 400

    # Traffic on "sql" and the base model keeps flowing while "chat" comes and goes.
    failures: list[BaseException] = []
    answers: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                answers.append(_answer(lora_stack, "sql"))
            except BaseException as exc:
                failures.append(exc)

    workers = [threading.Thread(target=traffic) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        loaded = _admin(lora_stack, "load_lora_adapter", body)
        assert loaded.status_code == 200, loaded.text
        assert _answer(lora_stack, "chat") == _expected_text(checkpoint, models["chat"])
        assert any(m.id == "chat" for m in _client(lora_stack).models.list().data)
        unloaded = _admin(lora_stack, "unload_lora_adapter", {"lora_name": "chat"})
        assert unloaded.status_code == 200, unloaded.text
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not failures, failures
    assert answers and set(answers) == {_expected_text(checkpoint, models["sql"])}
    with pytest.raises(openai.NotFoundError):
        _answer(lora_stack, "chat")
    again = _admin(lora_stack, "unload_lora_adapter", {"lora_name": "chat"})
    assert again.status_code == 404
