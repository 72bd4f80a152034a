"""The in-process engine: ``add_request`` / ``step`` / ``abort``, and generate helpers.

One step: the scheduler picks sequences and token counts, the model runner executes them,
the sampler extends those that reached their end, and the update frees what finished.
Constrained samples get their grammar masks filled while the model runs, and after sampling
their matchers advance and jump over what the grammar forces (``engine/structured/``).
Everything runs on the caller's thread; services run this loop in a thread of their own.

Under data-parallel attention (``data_parallel_size`` > 1) the engine keeps one
:class:`_Shard` (scheduler, KV pool, input builder) per data-parallel rank, gives each new
request to the least loaded, and runs every rank's batch in the same step: the other ranks'
inputs go out first, this process runs its own (rank 0's) batch, and the others' logits
rows come back to be sampled here. When the MoE layers exchange tokens between the ranks
(expert parallelism), a rank with nothing to run takes a one-token dummy batch on the
scratch block, so every rank enters the layers' collectives together. With speculation each
data-parallel rank has its own proposer (n-gram lookup shares one): a model-based one runs
its steps in that rank's process, where the rank's features and draft caches live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import torch

from engine_service.engine.attention import get_attention_backend
from engine_service.engine.batch import SampledTokens, ScheduledBatch, ScheduledSequence
from engine_service.engine.config import EngineConfig
from engine_service.engine.kv_cache import KVCacheManager
from engine_service.engine.kv_events import KVEventLog, KVTier, SharedKVEvents
from engine_service.engine.kv_handoff import (
    HandoffEvent,
    KVExport,
    KVImport,
    KVImports,
    KVReserved,
    PrefillDone,
    export_ready_blocks,
)
from engine_service.engine.lora_manager import LoRAAdapter, LoRADisabledError, LoRAManager
from engine_service.engine.memory import allocate_kv_cache, kv_block_bytes, num_kv_blocks
from engine_service.engine.model_runner import ModelRunner, StepInputs
from engine_service.engine.multimodal import EncoderCache, EncoderRunner, ImageInput
from engine_service.engine.offload import OffloadManager, RemoteKVStore
from engine_service.engine.offload_rank import RankOffload, rank_kv_fingerprint
from engine_service.engine.outputs import EngineStats, LoRAStats, RequestOutput, TokenLogprob
from engine_service.engine.parallel.channel import StepChannel
from engine_service.engine.parallel.offload_link import OffloadLink
from engine_service.engine.parallel.ranks import RankContext, WorkerRanks, init_distributed
from engine_service.engine.progress import TokenAcceptor
from engine_service.engine.request import Request
from engine_service.engine.sampler import SamplerResult, SamplingMetadata, sample
from engine_service.engine.sampling_params import SamplingParams
from engine_service.engine.scheduler import Scheduler
from engine_service.engine.spec.config import SpeculativeConfig
from engine_service.engine.spec.grammar import draft_grammar_masks
from engine_service.engine.spec.proposers import Proposer, build_proposer, step_tree_size
from engine_service.engine.spec.verify import verify
from engine_service.engine.structured import StructuredOutputManager
from engine_service.engine.structured.backend import GrammarMatcher
from engine_service.layers.moe import FusedMoE
from engine_service.layers.parallel import SINGLE
from engine_service.models.loader import attention_needs, load_model

logger = logging.getLogger(__name__)

# How long an engine with nothing to run but remote fetches in flight waits for one.
_FETCH_WAIT_S = 0.002


@dataclass(slots=True)
class _InFlight:
    """A launched step: its batch and, once done, its sampled tokens."""

    batch: ScheduledBatch
    result: SamplerResult | None = None
    meta: SamplingMetadata | None = None
    future: Future | None = None

    def wait(self) -> None:
        if self.future is not None:
            self.result, self.meta = self.future.result()
            self.future = None


@dataclass(slots=True)
class _Shard:
    """One data-parallel rank's share of the engine: its requests' scheduler and KV pool,
    the runner that builds its steps (rank 0's own runner, or one that only prepares and
    sends them to that rank), its proposer (speculation) and the offload decisions for its
    pool."""

    rank: int
    kv_manager: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    proposer: Proposer | None = None
    offload: OffloadManager | None = None

    @property
    def load(self) -> int:
        return len(self.scheduler.running) + self.scheduler.num_waiting


class LLMEngine:
    """A batched engine serving one model; not thread-safe (drive it from one thread).

    ``remote_kv_store`` (used with ``config.enable_kv_offload``) is the shared store below
    the host tier; :meth:`close` stops the offload worker that talks to it.
    """

    def __init__(self, config: EngineConfig, remote_kv_store: RemoteKVStore | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        # Under tensor/expert parallelism this process is rank 0 and starts the others.
        self._ranks: WorkerRanks | None = None
        self._rank_ctx: RankContext | None = None
        self._channel: StepChannel | None = None
        if config.world_size > 1:
            store_spec = None
            if config.enable_kv_offload and remote_kv_store is not None:
                store_spec = remote_kv_store.reopen_spec()
                if store_spec is None:
                    raise ValueError(
                        f"{type(remote_kv_store).__name__} cannot be opened by the engine's "
                        "other ranks (it has no reopen_spec), so a parallel engine cannot "
                        "offload to it"
                    )
            self._ranks = WorkerRanks(config, kv_store_spec=store_spec)
            self._ranks.start()
        try:
            if self._ranks is not None:
                self._rank_ctx = init_distributed(config, 0, self._ranks.address)
                self.device = self._rank_ctx.device
                ctx = self._rank_ctx
                if config.data_parallel_size == 1:
                    self._channel = StepChannel(self.device, ctx.cpu_group, ctx.device_group)
                elif config.tensor_parallel_size > 1:
                    # Data parallel: rank 0's steps go to the rest of its tensor-parallel
                    # group; the other data-parallel ranks' channels are made in _setup.
                    peers = tuple(range(1, config.tensor_parallel_size))
                    self._channel = StepChannel(
                        self.device, ctx.cpu_group, ctx.device_group, peers=peers
                    )
            self._setup(config, remote_kv_store)
        except BaseException:
            if self._ranks is not None:
                self._ranks.close(None, timeout_s=0)
            raise

    def _setup(self, config: EngineConfig, remote_kv_store: RemoteKVStore | None) -> None:
        tp = self._rank_ctx.tp if self._rank_ctx is not None else SINGLE
        torch.manual_seed(config.seed)
        backend = get_attention_backend(
            config.attention_backend, self.device, attention_needs(config.model, config.revision)
        )
        self.model, self.model_config, self.dtype = load_model(
            config.model, backend, config.dtype, self.device, config.revision, tp
        )
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {limit}"
            )
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        # Vision-language models: the encoder and its output cache.
        self.encoder: EncoderRunner | None = None
        if hasattr(self.model, "encode_images"):
            cache = EncoderCache(int(config.mm_encoder_cache_gb * (1 << 30)))
            self.encoder = EncoderRunner(self.model, cache)
        # Adapters attach to the model before any CUDA graph is captured (as no-ops there).
        self.lora: LoRAManager | None = None
        if config.enable_lora:
            self.lora = LoRAManager(
                self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras
            )
            if self._channel is not None:  # the other ranks repeat every slot write
                self.lora.slot_listeners.append(self._channel.queue_slot_write)
            for name, source in config.lora_modules:
                self.lora.add(name, source)
        # Requests whose adapter waits for a free device slot, in arrival order, and the
        # slot each admitted request id pins.
        self._lora_waiting: list[tuple[Request, LoRAAdapter]] = []
        self._lora_slot_of: dict[str, int] = {}
        self._lora_name_of: dict[str, str] = {}

        num_blocks = num_kv_blocks(config, self.model_config, self.dtype, self.device)
        if self._rank_ctx is not None:
            num_blocks = self._rank_ctx.agree_min(num_blocks)
        # A sequence longer than the whole pool could never be (re)admitted and would stall
        # the queue behind it forever, so the pool bounds the context too.
        pool_tokens = num_blocks * config.block_size
        if config.max_model_len is not None and config.max_model_len > pool_tokens:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the KV pool's "
                f"{pool_tokens} tokens ({num_blocks} blocks of {config.block_size})"
            )
        self.max_model_len = min(config.max_model_len or limit, pool_tokens)
        mc = self.model_config
        self.kv_cache = allocate_kv_cache(
            num_blocks, config.block_size, mc, self.dtype, self.device, tp.size
        )
        self.kv_events = KVEventLog() if config.enable_kv_events else None
        # What this engine's KV blocks mean: blocks move to or from another engine (the KV
        # service, a prefill or decode engine) only under the same fingerprint. Under tensor
        # parallelism it is rank 0's (its slice of the heads); every rank has its own.
        self.kv_fingerprint, _ = rank_kv_fingerprint(
            config.model, mc, config.block_size, self.kv_cache, tp
        )
        self.kv_imports = KVImports(self.kv_cache, config.block_size)
        self._handoff_events: list[HandoffEvent] = []
        self._exporting: set[str] = set()  # request ids whose prompt KV is being exported
        events: KVEventLog | SharedKVEvents | None = self.kv_events
        if self.kv_events is not None and config.data_parallel_size > 1:
            events = SharedKVEvents(self.kv_events)  # the ranks' pools and host tiers as one
        self._remote_kv_store = remote_kv_store
        self.offload: OffloadManager | None = None
        if config.enable_kv_offload:
            self.offload = self._offload_manager(0, self._channel, events)
        listeners = [x for x in (self.offload, events) if x is not None]
        self.kv_manager = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching, listeners
        )
        self.structured = StructuredOutputManager(
            config.model,
            config.revision,
            self.model_config.vocab_size,
            self.eos_token_ids,
            default_backend=config.grammar_backend,
            pin_memory=self.device.type == "cuda",
        )
        self.acceptor = TokenAcceptor(
            self.max_model_len, self.structured, config.enable_jump_forward
        )
        self.scheduler = Scheduler(config, self.kv_manager, self.offload, self.acceptor)
        # The proposer comes before the runner: an EAGLE head has the target keep the
        # hidden states it reads, which CUDA graphs must capture.
        self.proposer: Proposer | None = None
        spec: SpeculativeConfig | None = None
        self._tree_depth = 0  # the deepest a draft tree grows (its accepted paths' moves)
        if config.speculative_config:
            spec = SpeculativeConfig.parse(config.speculative_config)
            self._tree_depth = spec.num_speculative_tokens
            self.proposer = build_proposer(
                spec,
                config,
                self.model_config,
                backend,
                num_blocks,
                self.max_model_len,
                target_model=self.model,
                device=self.device,
                tp=tp,
                channel=self._channel,
            )
            if self.proposer.hidden_store is not None:
                self.model.keep_hidden_states(self.proposer.hidden_store)
        graphs_max_tokens = 0
        # Not under parallelism yet: every rank would have to capture and replay in step.
        if (
            config.enable_cuda_graphs
            and self.device.type == "cuda"
            and backend.supports_cuda_graphs
            and not getattr(self.model, "computes_own_attention", False)
            and config.world_size == 1
        ):
            graphs_max_tokens = min(config.cuda_graph_max_batch, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model,
            backend,
            self.kv_cache,
            config.block_size,
            max_num_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // config.block_size),
            scratch_block=num_blocks,
            graphs_max_tokens=graphs_max_tokens,
            lora_slots=self.lora.slots if self.lora is not None else None,
            channel=self._channel,
            tp_size=tp.size,
            hidden_store=self.proposer.hidden_store if self.proposer is not None else None,
            custom_masks=spec is not None and spec.tree_size > 0,
        )
        if self.proposer is not None and self.runner.graphs is not None:
            # The proposer's forwards replay graphs too, in the target graphs' memory pool.
            self.proposer.capture_graphs(
                graphs_max_tokens, config.max_num_seqs, pool=self.runner.graphs.pool
            )
        self._shards = [
            _Shard(0, self.kv_manager, self.scheduler, self.runner, self.proposer, self.offload)
        ]
        self._shard_of: dict[str, _Shard] = {}
        for dp_rank in range(1, config.data_parallel_size):
            self._shards.append(self._peer_shard(dp_rank, num_blocks, events))
        # Whether every rank must run every step: the MoE layers exchange tokens.
        self._lockstep = config.data_parallel_size > 1 and any(
            isinstance(m, FusedMoE) and m.ep is not None for m in self.model.modules()
        )
        self._dummy = self._dummy_batch(num_blocks)
        self.dummy_steps = 0  # ranks' dummy batches run (data-parallel attention)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        # The ranks' steps are built, sent and sampled together, one step at a time.
        self.async_scheduling = config.async_scheduling and config.data_parallel_size == 1
        if self.proposer is not None:
            for shard in self._shards:
                # A tree reserves a slot per node; a chain one per token.
                shard.scheduler.num_speculative_tokens = max(
                    spec.num_speculative_tokens, spec.tree_size
                )
                if spec.tree_batch_tokens and shard.proposer is not None:
                    # Trees under a batch budget: reserve what the step's trees will take.
                    shard.scheduler.size_trees = partial(step_tree_size, shard.proposer)
            # Proposals read each sequence's newest token on the host: no step runs ahead.
            self.async_scheduling = False
        # Overlapped steps on the CPU run the model on a worker thread (torch releases the
        # GIL inside its kernels); on CUDA the stream itself runs ahead of the host.
        self._worker: ThreadPoolExecutor | None = None
        if self.async_scheduling and self.device.type == "cpu":
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="engine-device")
        self._in_flight: _InFlight | None = None
        self._samples: dict[str, list[Request]] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.prompt_tokens_total = 0
        self.steps_total = 0
        logger.info(
            "engine ready: %s, %s on %s, %d KV blocks of %d tokens, %d rank(s)",
            mc.architecture,
            self.dtype,
            self.device,
            num_blocks,
            config.block_size,
            config.world_size,
        )

    def _offload_manager(
        self,
        dp_rank: int,
        channel: StepChannel | None,
        events: KVEventLog | SharedKVEvents | None,
    ) -> OffloadManager:
        """Offload decisions for data-parallel rank ``dp_rank``'s KV pool: its blocks live on
        that rank's tensor-parallel group (global ranks ``dp_rank * tp ..``), rank 0's own
        share here (``local``), the others' reached through ``channel`` and the pool's
        offload group. Host slots are counted per rank, of that rank's share of a block."""
        config, ctx = self.config, self._rank_ctx
        tp = config.tensor_parallel_size
        block_bytes = kv_block_bytes(self.model_config, config.block_size, self.dtype, tp)
        num_slots = config.kv_offload_host_bytes // block_bytes
        local = None
        if dp_rank == 0:
            local = RankOffload(
                self.kv_cache, num_slots, self.kv_fingerprint, self._remote_kv_store
            )
        peers = None
        ranks = tuple(r for r in range(dp_rank * tp, (dp_rank + 1) * tp) if r != 0)
        if ranks:
            assert ctx is not None and channel is not None
            peers = OffloadLink(channel, ctx.offload_groups[dp_rank], ranks)
        return OffloadManager(
            num_slots,
            local,
            peers,
            remote=self._remote_kv_store is not None,
            write_through=config.kv_write_through,
            events=events,
            remote_retry_s=config.kv_remote_retry_s,
        )

    def _peer_shard(
        self, dp_rank: int, num_blocks: int, events: KVEventLog | SharedKVEvents | None
    ) -> _Shard:
        """Data-parallel rank ``dp_rank``'s scheduler, KV pool and offload decisions, kept
        here; its steps go point to point to the ranks of its tensor-parallel group (global
        ranks ``dp_rank * tp .. dp_rank * tp + tp - 1``), whose first sends the logits
        back."""
        config, ctx = self.config, self._rank_ctx
        assert ctx is not None
        tp = config.tensor_parallel_size
        peers = tuple(range(dp_rank * tp, (dp_rank + 1) * tp))
        channel = StepChannel(self.device, ctx.cpu_group, ctx.device_group, peers=peers)
        offload = None
        if config.enable_kv_offload:
            offload = self._offload_manager(dp_rank, channel, events)
        listeners = [x for x in (offload, events) if x is not None]
        kv_manager = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching, listeners
        )
        scheduler = Scheduler(config, kv_manager, offload, self.acceptor)
        runner = ModelRunner.for_peer(
            self.model,
            self.device,
            config.block_size,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            -(-self.max_model_len // config.block_size),
            num_blocks,
            channel,
            self.lora.slots if self.lora is not None else None,
        )
        if self.lora is not None:  # that rank repeats every slot write
            self.lora.slot_listeners.append(channel.queue_slot_write)
        proposer = None
        if self.proposer is not None:  # its model runs in that rank's group, on its batch
            proposer = self.proposer.for_peer(channel.for_drafts())
        return _Shard(dp_rank, kv_manager, scheduler, runner, proposer, offload)

    @staticmethod
    def _dummy_batch(scratch_block: int) -> ScheduledBatch:
        """One token at position 0 whose KV goes to the scratch block (past the pool, never
        read): what an idle rank runs so that its MoE layers join the others' exchanges."""
        request = Request("dp-dummy", [0], SamplingParams(max_tokens=1), frozenset())
        request.block_table = [scratch_block]
        sequence = ScheduledSequence(request, start=0, num_tokens=1, num_logits=0)
        return ScheduledBatch(sequences=[sequence], num_tokens=1, num_logits=0)

    @property
    def max_num_seqs(self) -> int:
        """Sequences the engine runs at once: ``max_num_seqs`` per data-parallel rank."""
        return self.config.max_num_seqs * self.config.data_parallel_size

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        *,
        grammar: GrammarMatcher | None = None,
        adapter: str | None = None,
        images: list[ImageInput] | None = None,
        kv_export: KVExport | None = None,
        import_kv: bool = False,
    ) -> None:
        """Queue a request; raises ``ValueError`` for input the engine cannot serve. Only
        requests with the same ``cache_salt`` share prefix-cache blocks.

        ``images`` are the prompt's preprocessed images, each over its run of placeholder
        tokens (a vision-language model only); the blocks holding an image's placeholders
        are keyed by its content hash.

        Disaggregation (:mod:`engine_service.engine.kv_handoff`): with ``kv_export`` the
        request ends at its first token, and its prompt blocks from
        ``kv_export.num_skip_blocks`` on come out of :meth:`take_handoff_events` as they are
        computed. With ``import_kv`` its prompt's blocks are reserved and filled by
        :meth:`receive_kv`; it runs once :meth:`finish_kv_import` hands it the first token.
        Both take one sample (n == 1) and no LoRA adapter on the importing side.

        ``grammar`` is a matcher already compiled for ``params.structured`` (by
        ``self.structured.matcher`` on another thread, so the step thread never compiles);
        without it the grammar is compiled here.

        ``adapter`` names a loaded LoRA adapter (``UnknownAdapterError``, a ``ValueError``,
        if it is not); the request waits aside, without holding others up, until a device
        slot is free for it. Its blocks are keyed by the adapter's content fingerprint."""
        lora_adapter = None
        if adapter:
            if self.lora is None:
                raise ValueError("LoRA adapters are not enabled on this engine (--enable-lora)")
            lora_adapter = self.lora.get(adapter)
        if request_id in self._samples:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, which leaves no room for output"
            )
        if any(t < 0 or t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        params.validate()
        if params.n > self.config.max_num_seqs:
            raise ValueError(
                f"n ({params.n}) exceeds the {self.config.max_num_seqs} sequences this "
                "engine runs at once"
            )
        images = self._check_images(prompt_token_ids, images or [])
        if (kv_export is not None or import_kv) and params.n != 1:
            raise ValueError("a disaggregated request (KV hand-off) takes n == 1")
        if (kv_export is not None or import_kv) and len(self._shards) > 1:
            # Its blocks would live in another data-parallel rank's process.
            raise ValueError(
                "a disaggregated request (KV hand-off) is not supported with "
                "data_parallel_size > 1 yet"
            )
        if (kv_export is not None or import_kv) and self.config.tensor_parallel_size > 1:
            # Each rank holds its own heads' KV; rank 0 alone would move a fraction of it.
            raise ValueError(
                "a disaggregated request (KV hand-off) is not supported with "
                "tensor_parallel_size > 1 yet"
            )
        if import_kv and lora_adapter is not None:
            raise ValueError("a request with a LoRA adapter cannot import its prompt's KV")
        if import_kv and images:
            raise ValueError("a request with images cannot import its prompt's KV")
        if grammar is None and params.structured is not None:
            # Loads the tokenizer on first use and compiles the grammar unless it is cached.
            grammar = self.structured.matcher(params.structured)
        mrope_positions, mrope_delta = None, 0
        if images and hasattr(self.model, "mrope_positions"):
            mrope_positions, mrope_delta = self.model.mrope_positions(len(prompt_token_ids), images)
        first = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=self.eos_token_ids,
            priority=priority,
            grammar=grammar,
            cache_salt=cache_salt or None,
            adapter_id=lora_adapter.cache_key if lora_adapter is not None else None,
            mm_inputs=images,
            mrope_positions=mrope_positions,
            mrope_delta=mrope_delta,
        )
        first.pending_forks = [first.fork(i) for i in range(1, params.n)]
        self._samples[request_id] = [first, *first.pending_forks]
        self.prompt_tokens_total += len(prompt_token_ids)
        if kv_export is not None:
            self._exporting.add(request_id)
        if import_kv:
            self.scheduler.add_importing(first)
        elif lora_adapter is None:
            first.kv_handoff = kv_export
            shard = min(self._shards, key=lambda s: s.load)  # the first on a tie
            self._shard_of[request_id] = shard
            shard.scheduler.add(first)
        else:
            first.kv_handoff = kv_export
            lora_adapter.requests_total += 1
            self._lora_name_of[request_id] = lora_adapter.name
            self._lora_waiting.append((first, lora_adapter))
            self._admit_lora_waiting()

    def _check_images(self, prompt: list[int], images: list[ImageInput]) -> list[ImageInput]:
        """The images in prompt order, each checked against the model and the prompt: its
        placeholder run lies inside the prompt and holds only the image token, and every
        image token of the prompt belongs to an image."""
        if not images:
            if self.encoder is not None and self.model.image_token_id in prompt:
                raise ValueError("the prompt holds image placeholder tokens but no images")
            return []
        if self.encoder is None:
            raise ValueError(f"this model ({self.model_config.architecture}) does not take images")
        token = self.model.image_token_id
        images = sorted(images, key=lambda image: image.offset)
        end = 0
        for position, image in enumerate(images):
            if image.offset < end or image.length <= 0:
                raise ValueError(
                    f"image {position}'s placeholder span overlaps another or is empty"
                )
            end = image.offset + image.length
            if end > len(prompt) or any(t != token for t in prompt[image.offset : end]):
                raise ValueError(
                    f"image {position}'s placeholder span [{image.offset}, {end}) is not a run "
                    f"of image tokens ({token}) in the prompt"
                )
            self.model.check_image(image)
        if prompt.count(token) != sum(image.length for image in images):
            raise ValueError("the prompt holds image placeholder tokens that no image fills")
        return images

    def add_lora(self, name: str, source: str, replace: bool = False) -> None:
        """Load and register a PEFT adapter (folder or hub id); ``ValueError`` says why a
        bad one is refused (``FileExistsError`` for a loaded name without ``replace``), and
        leaves every loaded adapter as it was."""
        self.register_lora(self.read_lora(name, source, replace), replace)

    def read_lora(self, name: str, source: str, replace: bool = False) -> LoRAAdapter:
        """The validated adapter, read without touching the engine's state: safe to call
        from another thread than the one stepping the engine."""
        if self.lora is None:
            raise LoRADisabledError("LoRA adapters are not enabled on this engine (--enable-lora)")
        self.lora.check_name(name, replace)
        return self.lora.read(name, source)

    def register_lora(self, adapter: LoRAAdapter, replace: bool = False) -> None:
        """Serve ``adapter`` (from :meth:`read_lora`) under its name."""
        if self.lora is None:
            raise LoRADisabledError("LoRA adapters are not enabled on this engine (--enable-lora)")
        self.lora.register(adapter, replace)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter; requests already queued with it finish with it."""
        if self.lora is None:
            raise LoRADisabledError("LoRA adapters are not enabled on this engine (--enable-lora)")
        self.lora.remove(name)

    def _admit_lora_waiting(self) -> None:
        """Hand the scheduler every waiting adapter request that gets a device slot."""
        assert self.lora is not None or not self._lora_waiting
        still: list[tuple[Request, LoRAAdapter]] = []
        for request, adapter in self._lora_waiting:
            try:
                slot = self.lora.acquire(adapter) if self.lora is not None else None
            except ValueError as exc:  # its files changed or vanished since it was loaded
                logger.error("request %s cannot start: %s", request.request_id, exc)
                self._samples.pop(request.request_id, None)
                self._lora_name_of.pop(request.request_id, None)
                for sample in (request, *request.pending_forks):
                    sample.finish("abort")
                    self._pending_outputs.append(self._output(sample))
                continue
            if slot is None:
                still.append((request, adapter))
                continue
            self._lora_slot_of[request.request_id] = slot
            for sample in (request, *request.pending_forks):
                sample.adapter_slot = slot + 1
            # Every data-parallel rank holds every slot (rank 0's writes repeat there).
            shard = min(self._shards, key=lambda s: s.load)
            self._shard_of[request.request_id] = shard
            shard.scheduler.add(request)
        self._lora_waiting = still

    def _release_lora(self, request_id: str) -> None:
        self._lora_name_of.pop(request_id, None)
        slot = self._lora_slot_of.pop(request_id, None)
        if slot is not None:
            assert self.lora is not None
            self.lora.release(slot)
        if self._lora_waiting:
            self._admit_lora_waiting()

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if it is unknown."""
        samples = self._samples.pop(request_id, None)
        if samples is None:
            return False
        scheduler = self._shard_of.pop(request_id, self._shards[0]).scheduler
        self._lora_waiting = [w for w in self._lora_waiting if w[0].request_id != request_id]
        self._release_lora(request_id)
        self._exporting.discard(request_id)
        for request in samples:
            if request.is_finished:
                continue
            scheduler.finish(request)
            request.finish("abort")
            self._pending_outputs.append(self._output(request))
        return True

    def unfinished_request_ids(self) -> list[str]:
        """Ids of the requests still queued or running."""
        return list(self._samples)

    def discard_pending_outputs(self) -> None:
        """Drop outputs not yet returned by ``step`` (after the caller failed them itself)."""
        self._pending_outputs = []

    def has_unfinished(self) -> bool:
        return (
            any(s.scheduler.has_unfinished() for s in self._shards)
            or bool(self._lora_waiting)
            or bool(self._pending_outputs)
            or self._in_flight is not None
        )

    def only_awaiting_kv(self) -> bool:
        """Whether stepping is pointless until a KV transfer delivers: every unfinished
        request holds reserved blocks and waits for its prompt's KV."""
        return (
            self.scheduler.only_awaiting_kv()
            and not self._lora_waiting
            and not self._pending_outputs
            and self._in_flight is None
        )

    # -- KV hand-off (disaggregation) -----------------------------------------------------

    def take_handoff_events(self) -> list[HandoffEvent]:
        """Reservations made, prompt blocks computed and first tokens sampled for KV
        hand-offs since the last call, in order."""
        events: list[HandoffEvent] = [
            KVReserved(r.request_id, r.kv_handoff.num_held_blocks)
            for r in self.scheduler.take_reservations()
        ]
        events.extend(self._handoff_events)
        self._handoff_events = []
        return events

    def _importing(self, request_id: str) -> Request | None:
        samples = self._samples.get(request_id)
        if not samples:
            return None
        request = samples[0]
        state = request.kv_handoff
        if not isinstance(state, KVImport) or not state.reserved:
            return None
        return request

    def receive_kv(self, request_id: str, first_block: int, blocks: torch.Tensor) -> bool:
        """Copy received prompt blocks into the request's reserved blocks. A chunk that does
        not fit (order, range, shape, dtype) fails the transfer: the request recomputes its
        prompt here. False when the request is not importing (any more)."""
        request = self._importing(request_id)
        if request is None:
            return False
        problem = self.kv_imports.check_chunk(request, first_block, blocks)
        if problem:
            self.fail_kv_import(request_id, problem)
            return False
        self.kv_imports.write(request, first_block, blocks)
        return True

    def finish_kv_import(
        self,
        request_id: str,
        token_id: int,
        logprob: TokenLogprob | None = None,
        generator_state: bytes = b"",
    ) -> bool:
        """The prefill engine's first token: once every prompt block is in, the request
        accepts it (stop checks, grammar, jump-forward, as if sampled here) and runs."""
        request = self._importing(request_id)
        if request is None:
            return False
        missing = self.kv_imports.missing(request)
        vocab = self.model_config.vocab_size
        if missing or not 0 <= token_id < vocab:
            reason = f"{missing} prompt blocks missing" if missing else f"token {token_id}"
            self.fail_kv_import(request_id, reason)
            return False
        if generator_state and request.generator is not None:
            state = torch.frombuffer(bytearray(generator_state), dtype=torch.uint8)
            request.generator.set_state(state)
        self.kv_imports.stats.skipped_blocks += request.kv_handoff.num_held_blocks
        self.kv_imports.stats.imports_done += 1
        self.scheduler.complete_import(request)
        self.acceptor.accept(request, token_id, logprob)
        if request.is_finished:
            self.scheduler.finish(request)
        self._pending_outputs.append(self._output(request))
        if request.is_finished:
            self._forget_if_done(request_id)
        return True

    def fail_kv_import(self, request_id: str, reason: str) -> bool:
        """Give up on the transfer: free the reserved blocks and compute the prompt here."""
        samples = self._samples.get(request_id)
        if not samples or not isinstance(samples[0].kv_handoff, KVImport):
            return False
        logger.warning("KV hand-off of %s failed (%s); recomputing the prompt", request_id, reason)
        self.kv_imports.stats.import_failures += 1
        self.scheduler.fail_import(samples[0])
        return True

    def _export_ready(self, batch: ScheduledBatch) -> None:
        """Copy out the prompt blocks this finished step completed, for exporting requests."""
        for seq in batch.sequences:
            request = seq.request
            if not isinstance(request.kv_handoff, KVExport):
                continue
            if request.is_finished or seq.epoch != request.num_preemptions:
                continue
            chunk = export_ready_blocks(
                request, self.kv_cache, self.config.block_size, seq.start + seq.num_known_tokens
            )
            if chunk is not None:
                self._handoff_events.append(chunk)

    def _prefill_done(self, request: Request) -> None:
        export = request.kv_handoff
        assert isinstance(export, KVExport)
        generator = request.generator
        logprobs = request.unreported_logprobs
        stats = self.kv_imports.stats
        stats.exports_done += 1
        stats.export_bytes += export.bytes_sent
        self._handoff_events.append(
            PrefillDone(
                request_id=request.request_id,
                token_id=request.all_token_ids[request.num_prompt_tokens],
                logprob=logprobs[0] if logprobs else None,
                generator_state=generator.get_state().numpy().tobytes() if generator else b"",
                num_cached_tokens=max(request.num_cached_tokens, 0),
                prefill_seconds=time.monotonic() - export.started_at,
                num_blocks_sent=export.next_block - export.num_skip_blocks,
                bytes_sent=export.bytes_sent,
            )
        )

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return new tokens and finishes since the last step.

        Synchronous: schedule, run, sample, commit. Overlapped (``async_scheduling``): the
        step scheduled and prepared here runs while the previous step's results are read
        back and committed, so the outputs returned are one step behind. Steps with a
        sample that needs its newest token on the host (grammar, penalties) drain first.
        """
        if len(self._shards) > 1:
            return self._step_data_parallel()
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._lora_waiting:
            self._admit_lora_waiting()  # adapters whose folder read finished may start now
        if self._in_flight is not None and self._must_drain():
            outputs.extend(self._resolve(self._in_flight))
            self._in_flight = None
        batch = self.scheduler.schedule()
        if not batch:
            if self._in_flight is not None:
                outputs.extend(self._resolve(self._in_flight))
                self._in_flight = None
            if self.offload is not None:
                self.offload.apply_transfers()
                if self.offload.fetches_in_flight:
                    self.offload.wait(_FETCH_WAIT_S)
            if self.lora is not None and self.lora.reads_in_flight:
                self.lora.wait_for_reads(_FETCH_WAIT_S)
            return outputs
        self.steps_total += 1
        draft_masks: dict[int, torch.Tensor] = {}
        if self.proposer is not None and any(s.draft_room for s in batch.sequences):
            drafts = self.proposer.propose(batch)
            if drafts:
                batch.place_drafts(drafts, self.proposer.tree_parents())
                draft_masks = draft_grammar_masks(batch, self.model_config.vocab_size)
        # Grammar masks fill on their worker while the inputs are built and the model runs.
        masks = self.structured.start_masks([r.grammar for _, r in batch.sample_rows])
        encoder_outputs = None
        if self.encoder is not None and any(s.mm_spans for s in batch.sequences):
            # Every image of the step not in the encoder cache, encoded in one batch.
            encoder_outputs = self.encoder.outputs_for(batch)
        inputs = self.runner.prepare(batch, encoder_outputs)
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            previous.wait()
        if self.offload is not None:
            # Saves of evicted blocks and restores, before the forward reuses any block.
            self.offload.apply_transfers()
        launched = self._launch(batch, inputs, masks, previous, draft_masks)
        if self.async_scheduling:
            self.scheduler.mark_in_flight(batch)
            self._in_flight = launched
            if previous is not None:
                outputs.extend(self._resolve(previous))
        else:
            if previous is not None:
                outputs.extend(self._resolve(previous))
            outputs.extend(self._resolve(launched))
        return outputs

    def _must_drain(self) -> bool:
        return not self.async_scheduling or any(r.needs_host_tokens for r in self.scheduler.running)

    def _launch(
        self, batch, inputs, masks, previous: _InFlight | None, draft_masks=None
    ) -> _InFlight:
        """Start the forward pass and sampling of ``batch``: queued on the device stream
        (CUDA), or on the device worker thread (CPU, overlapped)."""
        prev_tokens = previous.result.token_ids if previous is not None else None
        meta = None
        if self._worker is not None:
            # The sampling state is read here: once the step is submitted this thread marks
            # its tokens pending and commits the previous step's, which the worker would
            # see half done (min_tokens would count this step's own token as produced).
            meta = self._sampling_metadata(batch)

        def run() -> tuple[SamplerResult, SamplingMetadata]:
            try:
                logits = self.runner.execute(batch, inputs, prev_tokens)
                if self.proposer is not None:
                    self.proposer.observe_target(batch, self.runner.last_hidden)
            except BaseException:
                if masks is not None:
                    masks.result()
                raise
            return self._sample(batch, logits, masks, draft_masks, inputs, meta)

        if self._worker is not None:
            return _InFlight(batch, future=self._worker.submit(run))
        result, meta = run()
        return _InFlight(batch, result=result, meta=meta)

    def _sample(
        self,
        batch: ScheduledBatch,
        logits: torch.Tensor,
        masks,
        draft_masks=None,
        inputs: StepInputs | None = None,
        meta: SamplingMetadata | None = None,
    ) -> tuple[SamplerResult, SamplingMetadata]:
        """Sample ``batch``'s rows of ``logits`` (once its grammar ``masks`` are filled) and
        verify its drafts; the host copy of the tokens starts. With the step's ``inputs``
        (this engine's runner ran it), accepted tree paths are packed on the device first;
        ``meta``: the step's sampling state if read already (without the grammar's masks)."""
        bitmask = masks.result() if masks is not None else None
        if meta is None:
            meta = self._sampling_metadata(batch, bitmask)
        else:
            meta.grammar_bitmask = bitmask
        result = sample(logits, meta, self.generator)
        if batch.has_drafts:
            result.verification = verify(logits, batch, meta, self.generator, draft_masks)
            if result.verification is not None and inputs is not None:
                self.runner.move_accepted_paths(result.verification, inputs, self._tree_depth)
        result.start_host_copy()
        return result, meta

    def _sampling_metadata(self, batch: ScheduledBatch, bitmask=None) -> SamplingMetadata:
        return SamplingMetadata.build(
            batch.sample_rows,
            self.model_config.vocab_size,
            self.device,
            bitmask,
            num_logits=batch.num_logits,
        )

    def _step_data_parallel(self) -> list[RequestOutput]:
        """One step of every data-parallel rank (synchronous): schedule each rank's batch,
        send the other ranks theirs, run rank 0's, gather their logits, sample and commit."""
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._lora_waiting:
            self._admit_lora_waiting()
        batches = [shard.scheduler.schedule() for shard in self._shards]
        offloads = [shard.offload for shard in self._shards if shard.offload is not None]
        for offload in offloads:
            # Each pool's saves and restores, before its rank's next forward pass.
            offload.apply_transfers()
        if not any(batches):
            fetching = [offload for offload in offloads if offload.fetches_in_flight]
            if fetching:
                fetching[0].wait(_FETCH_WAIT_S)
            if self.lora is not None and self.lora.reads_in_flight:
                self.lora.wait_for_reads(_FETCH_WAIT_S)
            return outputs
        self.steps_total += 1
        # Each rank's drafts (a model-based proposer's steps run on that rank, in turn).
        draft_masks: list[dict[int, torch.Tensor]] = [{} for _ in batches]
        for d, (shard, batch) in enumerate(zip(self._shards, batches)):
            if shard.proposer is not None and any(s.draft_room for s in batch.sequences):
                drafts = shard.proposer.propose(batch)
                if drafts:
                    batch.place_drafts(drafts, shard.proposer.tree_parents())
                    draft_masks[d] = draft_grammar_masks(batch, self.model_config.vocab_size)
        masks = [
            self.structured.start_masks([r.grammar for _, r in b.sample_rows]) if b else None
            for b in batches
        ]
        steps: list[tuple[ScheduledBatch, StepInputs] | None] = []
        for shard, batch in zip(self._shards, batches):
            if not batch and self._lockstep:
                batch = self._dummy  # an idle rank still joins the MoE exchanges
                self.dummy_steps += 1
            encoder_outputs = None
            if batch and self.encoder is not None and any(s.mm_spans for s in batch.sequences):
                # Rank 0 encodes every rank's images; the embeddings go with the step.
                encoder_outputs = self.encoder.outputs_for(batch)
            steps.append((batch, shard.runner.prepare(batch, encoder_outputs)) if batch else None)
        # Every other rank's step goes out first: their forward passes run with this one.
        for shard, step in zip(self._shards[1:], steps[1:]):
            if step is not None:
                _, inputs = step
                assert shard.runner.channel is not None and inputs.broadcast is not None
                shard.runner.channel.send_step(
                    *inputs.broadcast, inputs.input_ids, inputs.mm_embeds
                )
        logits: list[torch.Tensor | None] = [None] * len(self._shards)
        if steps[0] is not None:
            logits[0] = self.runner.execute(*steps[0])
        vocab = self.model_config.vocab_size
        for d, (shard, batch) in enumerate(zip(self._shards, batches)):
            if d == 0 or not batch:
                continue
            if batch.num_logits:  # the rank sends only rows it has
                logits[d] = shard.runner.channel.recv_logits(batch.num_logits, vocab)
            else:
                logits[d] = torch.empty((0, vocab), dtype=torch.float32, device=self.device)
        for shard, batch, rows, mask, drafted in zip(
            self._shards, batches, logits, masks, draft_masks
        ):
            if not batch:
                continue
            result, meta = self._sample(batch, rows, mask, drafted)
            outputs.extend(self._resolve(_InFlight(batch, result, meta), shard))
        return outputs

    def _resolve(self, flight: _InFlight, shard: _Shard | None = None) -> list[RequestOutput]:
        """Read a launched step's tokens back and commit them (the scheduler's update of
        ``shard``, the first data-parallel rank's by default)."""
        shard = shard or self._shards[0]
        flight.wait()
        result = flight.result
        if self._exporting:
            self._export_ready(flight.batch)
        token_list, logprobs = result.to_host(flight.meta)
        token_lists = logprob_lists = None
        if result.verified:
            token_lists = [result.verified.get(i, [t]) for i, t in enumerate(token_list)]
            spec_logprobs = result.verified_logprobs or {}
            logprob_lists = [spec_logprobs.get(i, [lp]) for i, lp in enumerate(logprobs)]
        touched = shard.scheduler.update(
            flight.batch,
            SampledTokens(
                result.token_ids,
                token_list,
                logprobs,
                token_lists,
                logprob_lists,
                paths_moved=result.verification is not None and result.verification.moved_on_device,
            ),
        )
        moves = shard.kv_manager.take_slot_copies()
        if moves:  # accepted token-tree paths, packed before their freed tail is reused
            shard.runner.move_slots(moves)
        outputs = []
        for request in touched:
            if isinstance(request.kv_handoff, KVExport) and request.num_output_tokens:
                self._prefill_done(request)
                request.kv_handoff = None
                self._exporting.discard(request.request_id)
            outputs.append(self._output(request))
            if request.is_finished:
                self._forget_if_done(request.request_id)
        return outputs

    def _output(self, request: Request) -> RequestOutput:
        output = RequestOutput(
            request_id=request.request_id,
            index=request.index,
            new_token_ids=request.unreported_token_ids,
            new_logprobs=request.unreported_logprobs
            if request.params.logprobs is not None
            else None,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            stop_token_id=request.stop_token_id,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            num_output_tokens=request.num_output_tokens,
        )
        request.unreported_token_ids = []
        request.unreported_logprobs = []
        return output

    def _forget_if_done(self, request_id: str) -> None:
        samples = self._samples.get(request_id)
        if samples is not None and all(s.is_finished for s in samples):
            del self._samples[request_id]
            self._shard_of.pop(request_id, None)
            self._release_lora(request_id)

    # -- helpers --------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """The engine's figures; under data-parallel attention, summed over the ranks (one
        replica whose capacity is theirs together)."""
        shards = self._shards

        def total(attribute: str) -> int:
            return sum(getattr(s.scheduler, attribute) for s in shards)

        blocks_total = sum(s.kv_manager.num_blocks for s in shards)
        blocks_free = sum(s.kv_manager.num_free_blocks for s in shards)
        return EngineStats(
            num_running=sum(len(s.scheduler.running) for s in shards),
            num_waiting=total("num_waiting"),
            kv_usage=(
                self.kv_manager.usage if len(shards) == 1 else 1.0 - blocks_free / blocks_total
            ),
            num_blocks_total=blocks_total,
            num_blocks_free=blocks_free,
            prefix_cache_queries=total("prefix_cache_queries"),
            prefix_cache_hits=total("prefix_cache_hits"),
            num_preemptions=total("num_preemptions"),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.acceptor.generation_tokens_total,
            steps_total=self.steps_total,
            jump_forward_tokens=self.acceptor.jump_forward_tokens,
            spec_num_drafts=total("num_drafts"),
            spec_num_draft_tokens=total("draft_tokens"),
            spec_num_accepted_tokens=total("accepted_draft_tokens"),
            spec_accepted_per_position=tuple(
                sum(counts) for counts in zip(*(s.scheduler.accepted_per_position for s in shards))
            )[: self.scheduler.num_speculative_tokens],
            num_awaiting_kv=len(self.scheduler.importing),
            handoff=replace(self.kv_imports.stats),
            **self._offload_stats(),
            **self._encoder_stats(),
            lora=self._lora_stats(),
        )

    def _encoder_stats(self) -> dict[str, int]:
        encoder = self.encoder
        if encoder is None:
            return {}
        return {
            "mm_cache_queries": encoder.queries,
            "mm_cache_hits": encoder.hits,
            "mm_images_encoded": encoder.images_encoded,
            "mm_encoder_runs": encoder.encoder_runs,
            "mm_cache_entries": len(encoder.cache),
            "mm_cache_bytes": encoder.cache.used_bytes,
        }

    def _lora_stats(self) -> LoRAStats | None:
        if self.lora is None:
            return None
        names = self._lora_name_of
        running = {r.request_id for r in self.scheduler.running if r.request_id in names}
        return self.lora.stats(
            running=[names[rid] for rid in running],
            waiting=[name for rid, name in names.items() if rid not in running],
        )

    def _offload_stats(self) -> dict[str, int | bool]:
        """Offload figures, summed over the data-parallel ranks' pools."""
        figures: dict[str, int | bool] = {
            name: sum(getattr(s.scheduler, name) for s in self._shards)
            for name in ("host_hit_tokens", "remote_hit_tokens", "recomputed_tokens")
        }
        offloads = [s.offload for s in self._shards if s.offload is not None]
        if offloads:

            def total(name: str) -> int:
                return sum(getattr(o.stats, name) for o in offloads)

            figures.update(
                offloaded_blocks=total("offloaded_blocks"),
                restored_blocks_host=total("restored_blocks_host"),
                restored_blocks_remote=total("restored_blocks_remote"),
                remote_put_blocks=total("remote_put_blocks"),
                remote_errors=total("remote_errors"),
                host_blocks=sum(o.num_host_blocks for o in offloads),
                host_capacity_blocks=sum(o.host_capacity_blocks for o in offloads),
                remote_available=all(o.remote_available for o in offloads),
            )
        return figures

    def held_block_hashes(self) -> dict[KVTier, list[bytes]]:
        """Every block hash this engine holds, per tier (the KV events' starting point);
        the data-parallel ranks' pools and host tiers as one."""
        device: dict[bytes, None] = {}  # in order, once each
        host: dict[bytes, None] = {}
        for shard in self._shards:
            cache = shard.kv_manager.prefix_cache
            device.update(dict.fromkeys(cache.block_hashes() if cache is not None else []))
            if shard.offload is not None:
                host.update(dict.fromkeys(shard.offload.host_block_hashes()))
        return {KVTier.DEVICE: list(device), KVTier.HOST: list(host)}

    def close(self) -> None:
        """Stop background work (offload and device workers); the engine is unusable
        afterwards."""
        for shard in getattr(self, "_shards", []):
            if shard.offload is not None:  # before SHUTDOWN: it stops the ranks' I/O threads
                shard.offload.close()
        if self.lora is not None:
            self.lora.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if self._ranks is not None:
            self._ranks.close(self._send_shutdown)
            self._ranks = None

    def _send_shutdown(self) -> None:
        """SHUTDOWN to every other rank: one broadcast, or one message per data-parallel
        rank."""
        channels = [self._channel] if self._channel is not None else []
        channels += [s.runner.channel for s in getattr(self, "_shards", [])[1:]]
        for channel in channels:
            channel.send_shutdown()

    def stream(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Iterator[RequestOutput]:
        """Add one request and step until it finishes, yielding its outputs as they come.

        Other requests already in the engine keep running in the same steps.
        """
        self.add_request(request_id, prompt_token_ids, params)
        remaining = params.n
        while remaining:
            for output in self.step():
                if output.request_id == request_id:
                    yield output
                    remaining -= output.finished

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        adapters: list[str | None] | None = None,
        images: list[list[ImageInput] | None] | None = None,
    ) -> list[list[list[int]]]:
        """Offline batch: token ids of every sample of every prompt, in prompt order;
        ``adapters`` names each prompt's LoRA adapter (``None``: the base model), ``images``
        each prompt's images."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapter_list = adapters if adapters is not None else [None] * len(prompts)
        image_list = images if images is not None else [None] * len(prompts)
        ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        results = {rid: [[] for _ in range(p.n)] for rid, p in zip(ids, params_list)}
        for rid, prompt, p, adapter, imgs in zip(
            ids, prompts, params_list, adapter_list, image_list
        ):
            self.add_request(rid, prompt, p, adapter=adapter, images=imgs)
        while self.has_unfinished():
            for output in self.step():
                if output.request_id in results:
                    results[output.request_id][output.index].extend(output.new_token_ids)
        return [results[rid] for rid in ids]
