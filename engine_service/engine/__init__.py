"""The engine core: scheduler, paged KV cache, prefix cache, model runner and sampler.

It imports neither gRPC nor HTTP, so tests and benchmarks drive it in-process through
:class:`LLMEngine` (``add_request`` / ``step`` / ``abort``).
"""

from engine_service.engine.config import EngineConfig
from engine_service.engine.engine import LLMEngine
from engine_service.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from engine_service.engine.sampling_params import SamplingParams

__all__ = [
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
