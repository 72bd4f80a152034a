"""``switchyard up --speculative-config``: the same greedy answers as a stack without it.

Two stacks on one checkpoint, one speculating with n-gram lookup, driven through the official
``openai`` client; prompts that repeat themselves give the lookup something to propose.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.stack import API_KEY, MODEL_NAME, Stack, start_stack, stop_stack

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})


@pytest.fixture(scope="module")
def speculative_stack(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    started = start_stack(
        checkpoint,
        tmp_path_factory.mktemp("spec-stack"),
        engines=1,
        extra_args=["--speculative-config", NGRAM],
    )
    yield started
    stop_stack(started)


def answers(stack: Stack, prompts: list[str]) -> list[str]:
    client = openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    texts = []
    for prompt in prompts:
        reply = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0.0
        )
        texts.append(reply.choices[0].text)
        chat = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0.0,
        )
        texts.append(chat.choices[0].message.content)
    return texts


def test_greedy_answers_equal_the_non_speculative_stacks(stack: Stack, speculative_stack: Stack):
    prompts = [
        "red green blue red green blue red green blue red green",
        "def f(x): return x + 1\ndef g(x): return x + 1\ndef h(x): return",
        "Hello there!",
    ]
    assert answers(speculative_stack, prompts) == answers(stack, prompts)
