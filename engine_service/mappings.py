"""Mappings between the wire (protobuf messages, settings) and the engine core's types.

Pure functions: each raises ``ValueError`` for a value the engine cannot take, which the
servicer turns into ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from engine_service.engine import EngineConfig, EngineStats, RequestOutput, SamplingParams
from engine_service.engine.multimodal import ImageInput
from engine_service.engine.structured import GrammarSpec
from switchyard.block_hash import MediaSpan, image_hash
from switchyard.lora_modules import parse_lora_modules
from switchyard.settings import EngineSettings
from switchyard.v1 import common_pb2, engine_pb2

# The host tier stages blocks on their way to the KV service; it gets at least this much.
KV_STAGING_HOST_BYTES = 64 << 20


def load_from_stats(
    stats: EngineStats, *, num_queued: int = 0, max_num_seqs: int = 0, max_queued_requests: int = 0
) -> common_pb2.ReplicaLoad:
    """The load a replica reports: the engine's snapshot, with ``num_waiting`` raised to the
    service's own queue depth ``num_queued`` (it also counts requests the engine thread has
    not taken in yet, and grammars being compiled), and the replica's capacity."""
    return common_pb2.ReplicaLoad(
        num_running=stats.num_running,
        num_waiting=max(stats.num_waiting, num_queued),
        max_num_seqs=max_num_seqs,
        max_queued_requests=max_queued_requests,
        kv_usage=stats.kv_usage,
        prefix_hit_rate=stats.prefix_hit_rate,
        prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits,
        num_preemptions=stats.num_preemptions,
        prompt_tokens_total=stats.prompt_tokens_total,
        generation_tokens_total=stats.generation_tokens_total,
        host_hit_tokens=stats.host_hit_tokens,
        remote_hit_tokens=stats.remote_hit_tokens,
        recomputed_tokens=stats.recomputed_tokens,
        spec_acceptance_length=stats.spec_mean_acceptance_length,
        num_awaiting_kv=stats.num_awaiting_kv,
        kv_handoffs_total=stats.handoff.exports_done + stats.handoff.imports_done,
        kv_handoff_bytes_total=stats.handoff.export_bytes + stats.handoff.import_bytes,
    )


def sampling_params_from_proto(
    sampling: common_pb2.SamplingParams, num_prompt_tokens: int, max_model_len: int
) -> SamplingParams:
    """The engine's parameters for a request; raises ``ValueError`` when one is out of range.

    Unset proto3 fields mean: ``n`` 1, ``max_tokens`` the rest of the context window,
    ``temperature`` 0 (greedy), ``top_p`` 1, ``repetition_penalty`` 1, no seed, no logprobs.
    """
    return SamplingParams(
        n=sampling.n or 1,
        max_tokens=sampling.max_tokens or max(1, max_model_len - num_prompt_tokens),
        min_tokens=sampling.min_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty or 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
    )


# The pixel dtypes an image may arrive in (numpy names), and the largest image accepted.
_PIXEL_DTYPES = {"float32": np.float32, "float16": np.float16}
MAX_IMAGE_VALUES = 64 << 20


def images_from_proto(images: Sequence[engine_pb2.ImageInput]) -> list[ImageInput]:
    """The engine's images of a request, each hashed from the bytes received; raises
    ``ValueError`` when the bytes do not hold ``shape`` values of ``dtype``."""
    result = []
    for position, image in enumerate(images):
        dtype = _PIXEL_DTYPES.get(image.dtype)
        if dtype is None:
            raise ValueError(
                f"images[{position}]: dtype {image.dtype!r} is not one of "
                f"{', '.join(_PIXEL_DTYPES)}"
            )
        shape = tuple(image.shape)
        count = math.prod(shape) if shape else 0
        if not shape or count <= 0 or count > MAX_IMAGE_VALUES:
            raise ValueError(f"images[{position}]: shape {list(shape)} is empty or too large")
        if len(image.pixel_values) != count * np.dtype(dtype).itemsize:
            raise ValueError(
                f"images[{position}]: {len(image.pixel_values)} bytes do not hold "
                f"{list(shape)} values of {image.dtype}"
            )
        if image.grid_thw and len(image.grid_thw) != 3:
            raise ValueError(f"images[{position}]: grid_thw must have 3 values")
        grid = tuple(image.grid_thw) if image.grid_thw else None
        values = np.frombuffer(image.pixel_values, dtype=dtype).reshape(shape)
        span = MediaSpan(
            image.offset,
            image.length,
            image_hash(image.pixel_values, shape, image.dtype, grid),
        )
        result.append(ImageInput(span, torch.from_numpy(values.copy()), grid))  # type: ignore[arg-type]
    return result


def grammar_spec_from_proto(structured: common_pb2.StructuredOutput) -> GrammarSpec | None:
    """The engine's spec for a request's ``structured`` field; ``None`` when it names no
    constraint. Raises ``ValueError`` for an unknown backend, an empty constraint, or
    ``json_object`` set to false."""
    kind = structured.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        if not structured.json_object:
            raise ValueError("structured.json_object must be true when set")
        return GrammarSpec("json_object", backend=structured.backend)
    return GrammarSpec(kind, getattr(structured, kind), structured.backend)


def response_from_output(output: RequestOutput) -> engine_pb2.GenerateResponse:
    response = engine_pb2.GenerateResponse(
        index=output.index,
        token_ids=output.new_token_ids,
        finished=output.finished,
        finish_reason=output.finish_reason or "",
        num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens,
    )
    if output.stop_token_id is not None:
        response.stop_token_id = output.stop_token_id
    for logprob in output.new_logprobs or ():
        response.logprobs.append(
            common_pb2.TokenLogprob(
                token_id=logprob.token_id,
                logprob=logprob.logprob,
                top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
            )
        )
    return response


def engine_config_from_settings(settings: EngineSettings, model_path: str) -> EngineConfig:
    device = settings.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kv_service_address = settings.kv_service_address
    return EngineConfig(
        model=model_path,
        dtype=settings.dtype,
        device=device,
        max_model_len=settings.max_model_len,
        block_size=settings.block_size,
        num_kv_blocks=settings.num_kv_blocks,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        enable_chunked_prefill=settings.enable_chunked_prefill,
        long_prefill_token_threshold=settings.long_prefill_token_threshold,
        attention_backend=settings.attention_backend,
        enable_cuda_graphs=settings.enable_cuda_graphs,
        cuda_graph_max_batch=settings.cuda_graph_max_batch,
        grammar_backend=settings.grammar_backend,
        enable_jump_forward=settings.enable_jump_forward,
        async_scheduling=settings.async_scheduling,
        speculative_config=settings.speculative_config,
        seed=settings.seed,
        enable_kv_offload=bool(settings.kv_offload_host_bytes or kv_service_address),
        kv_offload_host_bytes=max(
            settings.kv_offload_host_bytes,
            KV_STAGING_HOST_BYTES if kv_service_address else 0,
        ),
        kv_write_through=settings.kv_write_through,
        enable_kv_events=True,
        enable_lora=settings.enable_lora,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        max_cpu_loras=settings.max_cpu_loras,
        lora_modules=tuple((m.name, m.path) for m in parse_lora_modules(settings.lora_modules)),
        mm_encoder_cache_gb=settings.mm_encoder_cache_gb,
        tensor_parallel_size=settings.tensor_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        enable_expert_parallel=settings.enable_expert_parallel,
    )
