"""Runs Triton kernels on the CPU, under Triton's interpreter, in a child process.

Triton chooses between compiling and interpreting when ``triton`` is imported and when each
kernel is decorated, both from ``TRITON_INTERPRET``; the test process may have imported
Triton already (other tests, other packages) and must keep doing so without the interpreter.
So the kernels run in one spawned child whose environment sets the variable before anything
imports Triton; calls cross as pickled tensors.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def _enable_interpreter() -> None:
    os.environ["TRITON_INTERPRET"] = "1"


def _call(target: str, args: tuple, kwargs: dict) -> Any:
    module_name, name = target.split(":")
    function = getattr(importlib.import_module(module_name), name)
    kernels = vars(importlib.import_module(module_name)).values()
    if not any(type(v).__name__ == "InterpretedFunction" for v in kernels):
        raise RuntimeError(f"{module_name} was not loaded under Triton's interpreter")
    return function(*args, **kwargs)


class InterpretedTriton:
    """Calls ``"module:function"`` launchers in a child process that interprets Triton."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_enable_interpreter,
        )

    def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        return self._pool.submit(_call, target, args, kwargs).result()

    def close(self) -> None:
        self._pool.shutdown()
