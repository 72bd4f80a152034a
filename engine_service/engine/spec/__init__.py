"""Speculative decoding: proposers draft tokens, the target verifies them in one step.

The scheduler reserves draft slots for decoding sequences (``ScheduledSequence.draft_room``),
a :class:`~engine_service.engine.spec.proposers.Proposer` fills them, the target runs them as
one extend with ``k + 1`` logits rows, :func:`~engine_service.engine.spec.verify.verify`
keeps the accepted prefix (lossless: greedy token for token, sampling by rejection), and
:meth:`Scheduler.update` commits it and frees the rejected slots.
"""
