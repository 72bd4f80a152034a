"""The Kubernetes backend against a loopback double of the Kubernetes API (no API server can
run here; see ``kubernetes_api_double``): engine pods follow into the routing table as they
become ready, drain while they are deleted, `kubectl scale` is followed both ways, and a lost
or expired watch is resumed without losing a change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from controller.kube_api import KubeApi
from controller.kubernetes_backend import KubernetesEnginePool
from controller.registry import ReplicaRegistry
from switchyard.v1 import common_pb2
from tests.controller.kubernetes_api_double import DEPLOYMENT, NAMESPACE, TOKEN, KubeApiDouble

READY = common_pb2.REPLICA_STATE_READY
DRAINING = common_pb2.REPLICA_STATE_DRAINING
STARTING = common_pb2.REPLICA_STATE_STARTING

pytestmark = pytest.mark.asyncio


class Cluster:
    """A double API server, a registry and a running pool that follows it."""

    def __init__(
        self, double: KubeApiDouble, pool: KubernetesEnginePool, registry: ReplicaRegistry
    ):
        self.double = double
        self.pool = pool
        self.registry = registry

    def routed(self) -> dict[str, int]:
        return {r.replica_id: r.state for r in self.registry.routing_table().replicas}

    def views(self) -> dict[str, int]:
        return {r.replica_id: r.state for r in self.pool.replica_views()}


async def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    double = KubeApiDouble()
    double.add_pod("engine-a", ip="10.0.0.1", ready=True)
    double.add_pod("engine-b", ip="10.0.0.2", ready=False)
    double.add_pod("other-app", ip="10.0.0.9", ready=True, labels={"app": "other"})
    registry = ReplicaRegistry(unhealthy_after_s=60.0, remove_after_s=120.0)
    api = KubeApi(double.url, token=TOKEN)
    pool = KubernetesEnginePool(
        api,
        registry,
        namespace=NAMESPACE,
        deployment=DEPLOYMENT,
        selector="app.kubernetes.io/component=engine",
        engine_port=50100,
        model="demo",
        scale_poll_s=0.05,
        retry_s=0.05,
    )
    task = asyncio.create_task(pool.run())
    c = Cluster(double, pool, registry)
    await eventually(lambda: "engine-a" in c.routed())
    yield c
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await api.aclose()
    double.close()


async def test_ready_pods_are_routed_and_unready_ones_show_as_starting(cluster: Cluster) -> None:
    assert cluster.routed() == {"engine-a": READY}
    replica = cluster.registry.get("engine-a")
    assert replica is not None
    assert (replica.address, replica.model) == ("10.0.0.1:50100", "demo")
    assert cluster.views() == {"engine-a": READY, "engine-b": STARTING}  # other-app: not ours


async def test_kubectl_scale_up_is_followed_as_new_pods_get_ready(cluster: Cluster) -> None:
    cluster.double.kubectl_scale(3)
    cluster.double.add_pod("engine-c")
    await eventually(lambda: cluster.pool.desired == 3)
    assert cluster.views()["engine-c"] == STARTING
    cluster.double.set_pod("engine-c", ip="10.0.0.3", ready=True)
    cluster.double.set_pod("engine-b", ready=True)
    await eventually(lambda: len(cluster.routed()) == 3)
    assert set(cluster.routed().values()) == {READY}


async def test_kubectl_scale_down_drains_the_pod_until_it_is_gone(cluster: Cluster) -> None:
    cluster.double.kubectl_scale(0)
    cluster.double.begin_delete("engine-a")
    await eventually(lambda: cluster.routed().get("engine-a") == DRAINING)
    assert cluster.pool.desired == 0
    # In-flight requests finish: it stays in the table, and its heartbeats do not revive it.
    assert cluster.registry.heartbeat("engine-a", common_pb2.ReplicaLoad(num_running=2))
    assert cluster.routed() == {"engine-a": DRAINING}
    cluster.double.delete_pod("engine-a")
    await eventually(lambda: "engine-a" not in cluster.views())
    assert cluster.registry.get("engine-a") is None


async def test_a_pod_that_never_gets_ready_is_never_routed(cluster: Cluster) -> None:
    cluster.double.add_pod("engine-stuck", ip="10.0.0.7", ready=False)
    for _ in range(3):  # it keeps changing (restarts) but never passes its probe
        cluster.double.set_pod("engine-stuck", ready=False)
    await eventually(lambda: "engine-stuck" in cluster.views())
    await asyncio.sleep(0.2)
    assert cluster.views()["engine-stuck"] == STARTING
    assert "engine-stuck" not in cluster.routed()
    cluster.double.delete_pod("engine-stuck")
    await eventually(lambda: "engine-stuck" not in cluster.views())


async def test_a_pod_that_fails_its_probe_drains_and_returns_when_ready(cluster: Cluster) -> None:
    cluster.double.set_pod("engine-a", ready=False)
    await eventually(lambda: cluster.routed().get("engine-a") == DRAINING)
    cluster.double.set_pod("engine-a", ready=True)
    await eventually(lambda: cluster.routed().get("engine-a") == READY)


async def test_an_engine_that_registered_itself_keeps_its_own_record(cluster: Cluster) -> None:
    cluster.registry.register(
        common_pb2.Replica(replica_id="engine-b", address="10.0.0.2:50100", max_model_len=4096)
    )
    cluster.double.set_pod("engine-b", ready=True)
    await asyncio.sleep(0.2)
    replica = cluster.registry.get("engine-b")
    assert replica is not None and replica.max_model_len == 4096


async def test_a_lost_watch_resumes_from_the_last_version_seen(cluster: Cluster) -> None:
    await eventually(lambda: len(cluster.double.pod_watches()) == 1)
    # Open, not only requested: a watch that opened after the drop would see the change.
    await eventually(lambda: cluster.double.open_watches() == 1)
    last_seen = cluster.double.state.rv
    with cluster.double.hidden():
        cluster.double.add_pod("engine-c", ip="10.0.0.3", ready=True)
    await eventually(lambda: "engine-c" in cluster.routed())
    watches = cluster.double.pod_watches()
    assert watches[1].query["resourceVersion"] == str(last_seen)
    assert len(cluster.double.pod_lists()) == 1  # resumed, not listed again


async def test_an_expired_watch_lists_again_and_catches_up(cluster: Cluster) -> None:
    with cluster.double.hidden(expire_history=True):
        cluster.double.delete_pod("engine-a")  # its DELETED event is never delivered
        cluster.double.add_pod("engine-c", ip="10.0.0.3", ready=True)
    await eventually(lambda: "engine-c" in cluster.routed())
    await eventually(lambda: "engine-a" not in cluster.views())
    assert len(cluster.double.pod_lists()) == 2
    assert cluster.registry.get("engine-a") is None


async def test_a_scale_order_patches_the_deployment(cluster: Cluster) -> None:
    await eventually(lambda: cluster.pool.desired == 1)
    assert cluster.pool.scale(4) == 1
    await eventually(lambda: cluster.double.state.scale_patches == [4])
    assert cluster.pool.desired == 4
    patch = cluster.double.requests("PATCH", "/deployments/switchyard-engine/scale$")[0]
    assert patch.content_type == "application/merge-patch+json"
    await asyncio.sleep(0.2)  # later reads of the scale agree with it
    assert cluster.pool.desired == 4


async def test_api_errors_are_retried(cluster: Cluster) -> None:
    cluster.double.fail_next(3)
    cluster.double.drop_watches()
    cluster.double.add_pod("engine-c", ip="10.0.0.3", ready=True)
    await eventually(lambda: "engine-c" in cluster.routed())
    assert cluster.pool.scale(2) == 1
    await eventually(lambda: cluster.double.state.replicas == 2)


async def test_a_restarted_container_that_deregistered_while_unready_is_routed_again(
    cluster: Cluster,
) -> None:
    cluster.double.set_pod("engine-a", ready=False)
    await eventually(lambda: cluster.routed().get("engine-a") == DRAINING)
    cluster.registry.deregister("engine-a")  # the engine's own goodbye as its container stops
    cluster.double.set_pod("engine-a", ready=True)  # the container restarted and passed its probe
    await eventually(lambda: cluster.routed().get("engine-a") == READY)
