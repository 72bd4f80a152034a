"""What happens to a sampled token once the scheduler commits it: it joins the sequence,
advances the sample's grammar (jumping over what the grammar forces), and may end it.

Called only from :meth:`Scheduler.update <engine_service.engine.scheduler.Scheduler.update>`.
"""

from __future__ import annotations

import logging

from engine_service.engine.outputs import TokenLogprob
from engine_service.engine.request import Request
from engine_service.engine.structured import StructuredOutputManager

logger = logging.getLogger(__name__)


class TokenAcceptor:
    """Appends sampled tokens to samples and decides when a sample ends.

    A sample ends on a stop or EOS token (after ``min_tokens``), at ``max_tokens``, when its
    grammar terminates, or when it fills ``max_model_len``.
    """

    def __init__(
        self,
        max_model_len: int,
        structured: StructuredOutputManager | None = None,
        enable_jump_forward: bool = True,
    ) -> None:
        self.max_model_len = max_model_len
        self.structured = structured
        self.enable_jump_forward = enable_jump_forward
        self.generation_tokens_total = 0
        self.jump_forward_tokens = 0

    def accept(
        self,
        request: Request,
        token_id: int,
        logprob: TokenLogprob | None,
        jump_forward: bool = True,
    ) -> None:
        """``jump_forward`` False: the token is followed by verified drafts whose KV is
        computed, so the grammar's forced bytes must not replace it."""
        request.append_token(token_id, logprob if request.params.logprobs is not None else None)
        self.generation_tokens_total += 1
        if request.grammar is not None:
            self._advance_grammar(request, jump_forward)
        if (
            not request.is_finished
            and not request.check_stop()
            and request.num_tokens >= self.max_model_len
        ):
            request.finish("length")

    def _advance_grammar(self, request: Request, jump_forward: bool = True) -> None:
        """Feed the newest token to the sample's matcher; finish the sample when its grammar
        is complete, else jump over the bytes the grammar forces next.

        Jump-forward skips samples that report logprobs: forced tokens have none of their own.
        """
        matcher = request.grammar
        assert matcher is not None and self.structured is not None
        token_id = request.all_token_ids[-1]
        if not matcher.accept_token(token_id):
            # The mask allowed the token, so the backend contradicts itself.
            logger.error("grammar matcher refused sampled token %d; aborting sample", token_id)
            request.finish("abort")
            return
        if matcher.is_terminated():
            stop = token_id if token_id in request.eos_token_ids else None
            request.finish("stop", stop_token_id=stop)
            return
        if not (self.enable_jump_forward and jump_forward) or request.params.logprobs is not None:
            return
        # Room for the tokens that replace the newest one: max_tokens and the context.
        room = min(
            request.params.max_tokens - request.num_output_tokens,
            self.max_model_len - request.num_tokens,
        )
        forced = self.structured.jump_forward(matcher, token_id, room + 1) if room > 0 else []
        if not forced:
            return
        request.replace_newest_token(forced)
        self.jump_forward_tokens += len(forced) - 1
        self.generation_tokens_total += len(forced) - 1
        if matcher.is_terminated():
            request.finish("stop")
