"""Speculative decoding: proposers draft tokens, the target verifies them in one step.

The scheduler reserves draft slots for decoding sequences (``ScheduledSequence.draft_room``),
a :class:`~engine_service.engine.spec.proposers.Proposer` fills them with a chain or a token
tree, the target runs them as one extend with a logits row per node,
:func:`~engine_service.engine.spec.verify.verify` keeps the path its own draws follow
(lossless: greedy and seeded requests token for token, sampled ones in distribution), and
:meth:`Scheduler.update` commits it and frees the rejected slots.
"""
