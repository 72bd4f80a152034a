"""Schema-driven fuzzing of the gateway: ``schemathesis`` reads ``/openapi.json`` from a
stack on the demo model and sends what the schema allows and what it does not (boundary
values first, then random bodies), and no request may get a server error (5xx). Afterwards
the stack still serves.

Bounded to a few examples per operation and a short context (so that no generation runs
long), it takes a couple of minutes on two cores.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import API_KEY, MODEL_NAME, Stack, start_stack, stop_stack

EXAMPLES_PER_OPERATION = 5


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A short context (the last --max-model-len wins), so that no generation runs long.
    started = start_stack(
        None,
        tmp_path_factory.mktemp("fuzz-stack"),
        engines=1,
        extra_args=["--max-model-len", "128"],
    )
    yield started
    stop_stack(started)


def test_schemathesis_finds_no_server_error_and_the_stack_stays_healthy(
    demo_stack: Stack, tmp_path: Path
) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{demo_stack.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--workers",
            "1",
            "--seed",
            "1",
            "--request-timeout",
            "60",
            "--header",
            f"Authorization: Bearer {API_KEY}",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,  # its example database goes there, not into the repository
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout

    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{demo_stack.url}/health", timeout=10).status_code == 200
    after = httpx.post(
        f"{demo_stack.base_url}/completions",
        json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4},
        headers=headers,
        timeout=60,
    )
    assert after.status_code == 200, after.text
    assert demo_stack.process.poll() is None


def test_the_document_describes_every_public_route(demo_stack: Stack) -> None:
    document = httpx.get(f"{demo_stack.url}/openapi.json", timeout=10).json()
    # Every route this part of the gateway serves (the platform's tools add their own).
    assert {
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/messages",
        "/health",
        "/live",
        "/metrics",
    } <= set(document["paths"])
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest"
    )
    assert {"400", "429", "503"} <= set(chat["responses"])
    assert chat["security"] == [{"bearer": []}, {"x-api-key": []}]
    assert httpx.get(f"{demo_stack.url}/docs", timeout=10).status_code == 200
