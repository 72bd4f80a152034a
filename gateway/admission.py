"""The gateway's bound on requests in flight in total.

Each generation holds one slot from when it is routed until its last delta is read (or it
fails, or its client goes away). Over the bound a request is refused at once with
:class:`GatewayBusy` (answered 429 with ``Retry-After``) instead of queueing in the gateway,
where it would only add to the latency of the requests already admitted. The per-replica
bound lives in the :class:`~gateway.routing.Router`.
"""

from __future__ import annotations


class GatewayBusy(Exception):
    """The gateway already has its maximum of requests in flight."""


class Admission:
    """Counts generations in flight; ``max_in_flight`` 0 means unbounded. Event loop only."""

    def __init__(self, max_in_flight: int = 0) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    def enter(self) -> None:
        """Takes a slot; raises ``GatewayBusy`` when none is free. :meth:`leave` gives it
        back (plain calls rather than a context manager: this runs on every request)."""
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            raise GatewayBusy(
                f"the gateway is at its limit of {self.max_in_flight} requests in flight"
            )
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
