"""``switchyard up`` as an operator meets it: a second stack differing only in ``--port``
serves beside the first with its own logs and state; a stack stopped and started again on
the same port comes up at once; an engine that cannot start ends ``up`` with the engine's
own words instead of a restart loop."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.chaos.checks import complete
from tests.chaos.conftest import stack_args
from tests.e2e.stack import Stack, free_port, marked_pids, start_stack, stop_stack

CANNOT_START_WITHIN_S = 120.0  # far below up's startup timeout (900 s): no waiting it out


def logs_of(stack: Stack) -> Path:
    port = stack.url.rsplit(":", 1)[1]
    return stack.data_dir / "stacks" / f"port-{port}" / "logs"


def test_a_second_stack_differing_only_in_port_serves_beside_the_first(
    chaos_stack: Stack, chaos_checkpoint: Path, chaos_dir: Path
) -> None:
    port = free_port()

    def second_stack(output_name: str) -> Stack:
        return start_stack(
            chaos_checkpoint,
            chaos_dir,
            engines=1,
            extra_args=stack_args(chaos_dir),
            port=port,
            data_dir=chaos_stack.data_dir,  # the same model cache and data folder
            explicit_ports=False,
            output_name=output_name,
        )

    second = second_stack("second.out")
    try:
        for stack in (chaos_stack, second):
            assert complete(stack).status_code == 200
        assert second.controller != chaos_stack.controller
        assert second.kv != chaos_stack.kv
        if chaos_stack.controller.endswith(":50051"):
            assert "port 50051 for the controller is taken; using" in second.output.read_text()
        for stack in (chaos_stack, second):
            for log in ("gateway.log", "controller.log", "kv.log", "engine-0.log"):
                assert (logs_of(stack) / log).stat().st_size > 0
        assert logs_of(second) != logs_of(chaos_stack)
        assert f":{port}" not in (logs_of(chaos_stack) / "gateway.log").read_text()
    finally:
        assert stop_stack(second) == 0
    assert marked_pids(second.mark) == []

    # At once, on the gateway port just released (its sockets may linger in TIME_WAIT): up
    # would refuse a taken --port, so coming up at all is the check.
    again = second_stack("second-again.out")
    try:
        assert complete(again).status_code == 200
    finally:
        assert stop_stack(again) == 0
    assert chaos_stack.process.poll() is None  # the first stack never noticed


def unsupported_architecture(checkpoint: Path) -> list[str]:
    config = checkpoint / "config.json"
    values = json.loads(config.read_text())
    values["architectures"] = ["FooForCausalLM"]
    config.write_text(json.dumps(values))
    return []


def bad_engine_flag(checkpoint: Path) -> list[str]:
    return ["--engine-args", "--no-such-flag 3"]


# The engine's exit status for each kind of start no restart can fix (missing weights too)
# is specified in tests/engine_service/test_cannot_start.py; here, what up makes of it.
@pytest.mark.parametrize(
    ("breakage", "engine_says"),
    [(unsupported_architecture, "FooForCausalLM"), (bad_engine_flag, "--no-such-flag")],
)
def test_an_engine_that_cannot_start_ends_up_with_its_own_message(
    chaos_checkpoint: Path, tmp_path: Path, breakage: object, engine_says: str
) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(chaos_checkpoint, checkpoint)
    extra = breakage(checkpoint)  # type: ignore[operator]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not come up") as failure:
        start_stack(checkpoint, tmp_path, engines=1, extra_args=extra)
    elapsed = time.monotonic() - started
    output = str(failure.value)
    assert "engine-0 cannot start" in output
    assert engine_says in output
    assert "Stopped." in output
    assert elapsed < CANNOT_START_WITHIN_S
    # One start, no restart loop.
    engine_log = tmp_path / "data" / "stacks"
    [log] = engine_log.glob("port-*/logs/engine-0.log")
    assert log.read_text().count("cannot start") + log.read_text().count("error:") >= 1
    controller_log = log.with_name("controller.log").read_text()
    assert controller_log.count('"started engine"') == 1
