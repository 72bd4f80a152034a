"""How completion output is shaped into OpenAI's legacy logprobs."""

from __future__ import annotations

from typing import Any, cast

from gateway.generation import SampleDelta
from gateway.openai_routes import _CompletionShape
from switchyard.v1 import common_pb2


class LetterTokenizer:
    """Token i stands for the i-th letter of the alphabet, doubled ("aa", "bb", ...)."""

    def token_text(self, token_id: int) -> str:
        return chr(ord("a") + token_id) * 2


def test_text_offsets_advance_token_by_token_within_one_delta():
    shape = _CompletionShape(cast(Any, LetterTokenizer()), "cmpl-1", "m", 1, with_logprobs=True)
    entries = [common_pb2.TokenLogprob(token_id=i, logprob=-0.5) for i in range(3)]
    delta = SampleDelta(index=0, text="aabbcc", logprobs=entries, token_ids=[0, 1, 2])
    shape.accumulate(delta)
    assert shape.logprobs[0].text_offset == [0, 2, 4]
