"""Speculation on the ranks other than 0: their part in drafting.

Rank 0 schedules, proposes and verifies alone (:mod:`engine_service.engine.spec.proposers`);
the other ranks only run the forward passes it sends. A proposer with a model gives them
some of those passes (``Kind.DRAFT_STEP`` messages), and each such rank holds a
:class:`DraftRank` to run them::

                      tensor parallel (one batch)            data parallel (a batch per rank)
    MTP layers        their shard, split like the target     (refused)
    draft model       its shard, split like the target       a copy per data-parallel rank,
                      (whole on rank 0 alone with            split over its tensor-parallel
                      draft_tensor_parallel_size 1: none)    group like the target
    EAGLE head        the head whole, the target's           a copy per data-parallel rank,
                      vocabulary-parallel embedding and      with that rank's features
                      lm_head, its own copy of the features
    n-gram            nothing (no model)                     nothing

Under tensor parallelism a draft step's collectives (the split layers' all-reduces, the
logits gathered on rank 0) pair up with rank 0's own run of the same step. Under data
parallelism each data-parallel rank (its tensor-parallel group, if any) drafts for its own
batch, and the group's first rank sends the step's results back to rank 0: the logits
rows, and for an EAGLE head the output rows it feeds back next.
"""

from __future__ import annotations

import torch

from engine_service.engine.config import EngineConfig
from engine_service.engine.model_runner import ModelRunner
from engine_service.engine.parallel.channel import StepMessage
from engine_service.engine.spec.config import SpeculativeConfig
from engine_service.engine.spec.eagle import load_eagle_head_runner, run_head
from engine_service.engine.spec.mtp import load_mtp
from engine_service.engine.spec.proposers import load_draft_model
from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.models.config import ModelConfig
from engine_service.models.eagle import EagleHead
from engine_service.models.hidden_states import HiddenStateStore


class DraftRank:
    """This rank's share of the proposer's model and its caches; :meth:`run` is one draft
    step. ``head``/``hidden_store``: an EAGLE head, which reads the target's features from
    the store (the engine has this rank's target keep them); ``None``: a draft model or the
    MTP layers, whose runner runs the step as it is."""

    def __init__(
        self,
        runner: ModelRunner,
        head: EagleHead | None = None,
        hidden_store: HiddenStateStore | None = None,
    ) -> None:
        self.runner = runner
        self.head = head
        self.hidden_store = hidden_store

    @torch.inference_mode()
    def run(self, step: StepMessage) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(fp32 logits or ``None``, an EAGLE head's output rows or ``None``) of one step."""
        inputs = step.inputs
        if self.head is None:
            return self.runner.run_step(inputs.input_ids, inputs, step.block_copies), None
        rows, logits = run_head(self.head, self.runner, self.hidden_store, inputs, step.hidden)
        return logits, rows


def build_draft_rank(
    config: EngineConfig,
    target: ModelConfig,
    target_model: torch.nn.Module,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    device: torch.device,
    tp: TensorParallel,
) -> DraftRank | None:
    """This rank's :class:`DraftRank` (``tp``: its place), or ``None`` when the proposer
    gives it nothing to run. Builds exactly what rank 0's proposer builds for itself, so
    that the ranks' caches and collectives match; an EAGLE head has ``target_model`` keep
    its features."""
    if not config.speculative_config:
        return None
    spec = SpeculativeConfig.parse(config.speculative_config)
    if spec.steps_on_every_rank(tp.size):
        draft_tp = tp
    elif tp.dp_size > 1 and spec.method not in ("ngram", "mtp"):
        draft_tp = SINGLE  # a whole copy per data-parallel rank, no collectives
    else:
        return None
    if spec.method == "mtp":
        _, runner = load_mtp(
            config, target, target_model, backend, num_blocks, max_model_len, draft_tp
        )
        return DraftRank(runner)
    if spec.method in ("eagle", "eagle3"):
        head, store, runner = load_eagle_head_runner(
            spec, config, target, target_model, backend, num_blocks, max_model_len, device
        )
        target_model.keep_hidden_states(store)
        return DraftRank(runner, head, store)
    return DraftRank(
        load_draft_model(spec, config, backend, num_blocks, max_model_len, device, draft_tp)
    )
