"""Test doubles for the controller: a clock that tests move and an in-memory backend."""

from __future__ import annotations

from controller.backend import Backend, Instance, Phase


class FakeClock:
    """A clock for monotonic time that only moves when a test sets `now`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeBackend(Backend):
    """Replicas as dicts; ``crash``, ``finish_stop`` and ``ignore_starts`` play the world."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.instances: dict[str, Instance] = {}
        self.starts: list[str] = []
        self.stops: list[str] = []
        self.ignore_starts = False

    async def observe(self) -> list[Instance]:
        return sorted(self.instances.values(), key=lambda i: i.ordinal)

    async def start(self, replica_id: str, ordinal: int) -> None:
        self.starts.append(replica_id)
        if self.ignore_starts:
            return
        current = self.instances.get(replica_id)
        if current is not None and current.phase is not Phase.EXITED:
            return
        self.instances[replica_id] = Instance(
            replica_id=replica_id,
            ordinal=ordinal,
            phase=Phase.RUNNING,
            started_at=self.clock(),
            exited_at=None,
            failures=0 if current is None else current.failures,
            address=f"127.0.0.1:{50100 + ordinal}",
        )

    async def stop(self, replica_id: str) -> None:
        self.stops.append(replica_id)
        current = self.instances.get(replica_id)
        if current is not None:
            self.instances[replica_id] = _with(current, phase=Phase.STOPPING)

    async def close(self) -> None:
        self.instances.clear()

    def crash(self, replica_id: str) -> None:
        current = self.instances[replica_id]
        self.instances[replica_id] = _with(
            current, phase=Phase.EXITED, exited_at=self.clock(), failures=current.failures + 1
        )

    def finish_stop(self, replica_id: str) -> None:
        del self.instances[replica_id]


def _with(instance: Instance, **changes: object) -> Instance:
    fields = {name: getattr(instance, name) for name in Instance.__slots__}
    fields.update(changes)
    return Instance(**fields)  # type: ignore[arg-type]
