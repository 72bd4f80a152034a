"""The tokens a request spends, counted where they are known (the generator) and read where
they are charged (the access middleware), through a context variable set per request."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class UsageMeter:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


usage_meter: ContextVar[UsageMeter | None] = ContextVar("usage_meter", default=None)


def count_prompt(tokens: int) -> None:
    meter = usage_meter.get()
    if meter is not None:
        meter.prompt_tokens += tokens


def count_completion(tokens: int) -> None:
    meter = usage_meter.get()
    if meter is not None:
        meter.completion_tokens += tokens
