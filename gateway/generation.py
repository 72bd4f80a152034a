"""One generation, independent of the API that asked for it: token ids in, text deltas out.

The :class:`Generator` checks the request against the context length, sends it to an
engine, and turns each sample's token stream into text deltas: incremental detokenization
first, then stop strings. When every sample has finished (the engine said so, or a stop
string matched) it stops reading, which cancels the engine call. API modules (OpenAI, and
later Anthropic) shape the deltas into their own responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from gateway.admission import Admission
from gateway.detokenizer import IncrementalDetokenizer
from gateway.engine_client import EngineClient, EngineError
from gateway.routing import RequestInfo, Router
from gateway.stop_strings import StopStringMatcher
from gateway.tokenization import ModelTokenizer
from gateway.usage import count_completion, count_prompt
from switchyard.block_hash import MediaSpan
from switchyard.v1 import common_pb2, engine_pb2


class ContextLengthError(ValueError):
    """The prompt, plus the tokens asked for, does not fit the model's context."""


@dataclass(slots=True)
class GenerationSpec:
    """A request as the engine will run it, before the output limit is settled."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    max_tokens: int | None
    stop: list[str] = field(default_factory=list)
    structured: common_pb2.StructuredOutput | None = None
    adapter: str = ""  # the LoRA adapter ``model`` resolved to; "" for the base model
    cache_salt: str = ""  # the client's prefix-cache isolation key; "" for none
    # The prompt's images, and their placeholder spans (block keys for prefix routing).
    images: list[engine_pb2.ImageInput] = field(default_factory=list)
    media: list[MediaSpan] = field(default_factory=list)


@dataclass(slots=True)
class SampleDelta:
    """New output of one sample: text, the tokens and logprobs behind it, and whether the
    sample ended (``finish_reason`` "stop" or "length"). Token-level formats (Harmony) parse
    ``token_ids``; the rest read ``text``."""

    index: int
    text: str
    logprobs: list[common_pb2.TokenLogprob]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0
    stop_string: str | None = None  # the stop string that ended the sample, if one did


@dataclass(slots=True)
class _Sample:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    num_tokens: int = 0
    finished: bool = False


class Generator:
    """Runs generations on the fleet through the router and the engine client."""

    def __init__(
        self,
        tokenizer: ModelTokenizer,
        router: Router,
        engines: EngineClient,
        admission: Admission | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.router = router
        self.engines = engines
        self.admission = admission or Admission()

    def max_model_len(self) -> int | None:
        return self.router.max_model_len() or self.tokenizer.max_model_len

    def resolve_max_tokens(self, spec: GenerationSpec) -> int:
        """The output limit: the one asked for, or what is left of the context."""
        prompt_len = len(spec.prompt_token_ids)
        context = self.max_model_len()
        if context is None:
            if spec.max_tokens is None:
                raise ContextLengthError(
                    "max_tokens is required: the model's context length is unknown"
                )
            return spec.max_tokens
        if spec.max_tokens is None:
            if prompt_len >= context:
                raise ContextLengthError(
                    f"this model's maximum context length is {context} tokens, but the prompt "
                    f"has {prompt_len} tokens"
                )
            return context - prompt_len
        if prompt_len + spec.max_tokens > context:
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens, but {prompt_len + spec.max_tokens} "
                f"were requested ({prompt_len} in the prompt, {spec.max_tokens} for the output); "
                "reduce the prompt or max_tokens"
            )
        return spec.max_tokens

    async def generate(
        self, spec: GenerationSpec, *, on_sent: Callable[[], object] | None = None
    ) -> AsyncIterator[SampleDelta]:
        """Yields deltas until every sample has finished; raises ``ContextLengthError``,
        ``GatewayBusy``, ``EngineError`` or ``NoReplicaAvailable`` (``ReplicasBusy``).
        The request holds an admission slot until the iterator is closed. ``on_sent`` is
        called once the request is on its way to an engine (:meth:`EngineClient.generate`),
        when the samples' detokenizers also decode the prompt context they start from."""
        spec.sampling.max_tokens = self.resolve_max_tokens(spec)
        request = engine_pb2.GenerateRequest(
            request_id=spec.request_id,
            prompt_token_ids=spec.prompt_token_ids,
            sampling=spec.sampling,
            structured=spec.structured,
            adapter=spec.adapter,
            cache_salt=spec.cache_salt,
            images=spec.images,
        )
        info = RequestInfo(
            request_id=spec.request_id,
            model=spec.model,
            prompt_token_ids=spec.prompt_token_ids,
            adapter=spec.adapter,
            cache_salt=spec.cache_salt,
            media=spec.media,
        )
        samples = [
            _Sample(
                IncrementalDetokenizer(self.tokenizer.decoder, spec.prompt_token_ids),
                StopStringMatcher(spec.stop),
            )
            for _ in range(max(spec.sampling.n, 1))
        ]
        unfinished = len(samples)
        count_prompt(len(spec.prompt_token_ids))

        def sent() -> None:
            for sample in samples:
                sample.detokenizer.prime()
            if on_sent is not None:
                on_sent()

        self.admission.enter()
        try:
            responses = self.engines.generate(request, info, on_sent=sent)
            try:  # contextlib.aclosing, without its two coroutines per request
                async for response in responses:
                    count_completion(len(response.token_ids))
                    sample = samples[response.index]
                    if sample.finished:
                        continue  # stopped by a stop string; the engine may still produce it
                    delta = _advance(sample, response)
                    if delta.finish_reason is not None:
                        sample.finished = True
                        unfinished -= 1
                    if delta.text or delta.token_ids or delta.finish_reason is not None:
                        yield delta
                    if unfinished == 0:
                        return
            finally:
                await responses.aclose()
        finally:
            self.admission.leave()
        raise EngineError(
            grpc.StatusCode.INTERNAL, "the engine ended the stream before every sample finished"
        )


def _advance(sample: _Sample, response: engine_pb2.GenerateResponse) -> SampleDelta:
    token_ids = list(response.token_ids)
    sample.num_tokens += len(token_ids)
    text = sample.stops.feed(sample.detokenizer.add(token_ids))
    finish_reason: str | None = None
    if sample.stops.stopped:
        finish_reason = "stop"
    elif response.finished:
        if response.finish_reason == "abort":
            raise EngineError(grpc.StatusCode.ABORTED, "the engine aborted the request")
        text += sample.stops.feed(sample.detokenizer.flush())
        if not sample.stops.stopped:
            text += sample.stops.flush()
        finish_reason = "stop" if sample.stops.stopped else (response.finish_reason or "stop")
    return SampleDelta(
        index=response.index,
        text=text,
        logprobs=list(response.logprobs),
        token_ids=token_ids,
        finish_reason=finish_reason,
        num_tokens=sample.num_tokens,
        stop_string=sample.stops.matched,
    )
