"""The autoscaler: the HPA rule on queue depth and KV usage, its bounds and its cooldown, and
its order reaching the engine Deployment's scale subresource through the loopback double of
the Kubernetes API (no API server can run here)."""

from __future__ import annotations

import asyncio

from controller.autoscaler import AutoscalePolicy, Autoscaler, autoscale_target
from controller.kube_api import KubeApi
from controller.kubernetes_backend import KubernetesEnginePool
from controller.registry import ReplicaRegistry
from switchyard.v1 import common_pb2
from tests.controller.kubernetes_api_double import DEPLOYMENT, NAMESPACE, TOKEN, KubeApiDouble

POLICY = AutoscalePolicy(
    min_replicas=1, max_replicas=6, target_waiting=4.0, target_kv_usage=0.8, cooldown_s=60.0
)


def loads(*pairs: tuple[int, float]) -> list[common_pb2.ReplicaLoad]:
    return [common_pb2.ReplicaLoad(num_waiting=w, kv_usage=kv) for w, kv in pairs]


def test_a_deep_queue_scales_up_in_proportion() -> None:
    assert autoscale_target(2, loads((12, 0.3), (12, 0.3)), POLICY) == 6  # 3x the target


def test_a_full_kv_cache_scales_up_even_with_an_empty_queue() -> None:
    assert autoscale_target(2, loads((0, 1.0), (0, 0.96)), POLICY) == 3  # ratio 1.225


def test_load_near_the_target_changes_nothing() -> None:
    assert autoscale_target(3, loads((4, 0.2), (4, 0.2), (3, 0.2)), POLICY) == 3


def test_an_idle_pool_shrinks_to_its_minimum() -> None:
    assert autoscale_target(4, loads((0, 0.0), (0, 0.0), (0, 0.0), (0, 0.0)), POLICY) == 1


def test_it_never_shrinks_while_replicas_are_still_starting() -> None:
    assert autoscale_target(4, loads((0, 0.1), (0, 0.1)), POLICY) == 4


def test_the_bounds_hold_with_or_without_load() -> None:
    assert autoscale_target(2, loads((400, 1.0)), POLICY) == 6
    assert autoscale_target(0, [], POLICY) == 1
    assert autoscale_target(9, [], POLICY) == 6


class StubPool:
    """Test double of the engine pool: records every scale order and takes it at once."""

    desired_known = True

    def __init__(self, desired: int) -> None:
        self.desired = desired
        self.orders: list[int] = []

    def scale(self, replicas: int) -> int:
        self.orders.append(replicas)
        previous, self.desired = self.desired, replicas
        return previous

    def replica_views(self) -> list[common_pb2.Replica]:
        return []


def busy_registry(count: int, waiting: int) -> ReplicaRegistry:
    registry = ReplicaRegistry(60.0, 120.0)
    for i in range(count):
        registry.register(common_pb2.Replica(replica_id=f"e-{i}", address=f"10.0.0.{i}:1"))
        registry.heartbeat(f"e-{i}", common_pb2.ReplicaLoad(num_waiting=waiting))
    return registry


def test_no_second_change_within_the_cooldown() -> None:
    now = [0.0]
    pool = StubPool(desired=1)
    registry = busy_registry(1, waiting=8)
    autoscaler = Autoscaler(pool, registry, POLICY, clock=lambda: now[0])
    assert autoscaler.tick() == 2
    registry.register(common_pb2.Replica(replica_id="e-1", address="10.0.0.1:1"))
    registry.heartbeat("e-1", common_pb2.ReplicaLoad(num_waiting=16))
    now[0] = 59.0
    assert autoscaler.tick() is None
    now[0] = 60.0
    assert autoscaler.tick() == 6  # mean waiting 12 over 2 ready: 3x the target
    assert pool.orders == [2, 6]


def test_draining_replicas_do_not_count_as_load() -> None:
    registry = busy_registry(2, waiting=4)
    registry.mark_draining("e-1")
    registry.heartbeat("e-1", common_pb2.ReplicaLoad(num_waiting=100))
    pool = StubPool(desired=1)
    assert Autoscaler(pool, registry, POLICY).tick() is None


def test_its_order_reaches_the_deployment() -> None:
    async def main() -> None:
        double = KubeApiDouble()
        double.add_pod("engine-a", ip="10.0.0.1", ready=True)
        api = KubeApi(double.url, token=TOKEN)
        registry = ReplicaRegistry(60.0, 120.0)
        pool = KubernetesEnginePool(
            api, registry, namespace=NAMESPACE, deployment=DEPLOYMENT,
            selector="app.kubernetes.io/component=engine", engine_port=50100, model="demo",
            scale_poll_s=0.05,
        )  # fmt: skip
        task = asyncio.create_task(pool.run())
        try:
            while registry.get("engine-a") is None or pool.desired != 1:
                await asyncio.sleep(0.01)
            registry.heartbeat("engine-a", common_pb2.ReplicaLoad(num_waiting=10))
            assert Autoscaler(pool, registry, POLICY).tick() == 3
            for _ in range(500):
                if double.state.scale_patches:
                    break
                await asyncio.sleep(0.01)
            assert double.state.scale_patches == [3]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.aclose()
            double.close()

    asyncio.run(asyncio.wait_for(main(), timeout=10))


def test_a_starting_controller_does_not_scale_before_it_read_the_deployment() -> None:
    async def main() -> None:
        double = KubeApiDouble()
        double.kubectl_scale(4)
        api = KubeApi(double.url, token=TOKEN)
        registry = ReplicaRegistry(60.0, 120.0)
        pool = KubernetesEnginePool(
            api, registry, namespace=NAMESPACE, deployment=DEPLOYMENT,
            selector="app.kubernetes.io/component=engine", engine_port=50100, model="demo",
            scale_poll_s=0.05,
        )  # fmt: skip
        # As the controller starts them: the autoscaler's first tick comes before the
        # pool's first read of the Deployment's size.
        tasks = [
            asyncio.create_task(Autoscaler(pool, registry, POLICY, interval_s=0.01).run()),
            asyncio.create_task(pool.run()),
        ]
        try:
            for _ in range(500):
                if pool.desired == 4:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert double.state.scale_patches == []
            assert pool.desired == 4
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await api.aclose()
            double.close()

    asyncio.run(asyncio.wait_for(main(), timeout=10))
