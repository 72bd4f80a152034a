"""The controller process with ``backend=kubernetes`` and leader election, against the
loopback double of the Kubernetes API (no API server can run here): it waits as a candidate
(alive, not ready) while another replica holds the Lease, then leads, serves the engine pods
it finds, turns a Scale order into a patch of the Deployment, and releases the Lease on
SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.server import SERVICE_NAME, serve
from switchyard.grpc_utils import insecure_channel
from switchyard.settings import ControllerSettings
from switchyard.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.controller.kubernetes_api_double import NAMESPACE, KubeApiDouble

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_candidate_leads_after_the_lease_expires_and_then_serves_the_pool() -> None:
    double = KubeApiDouble(token=None)  # as behind `kubectl proxy`
    double.add_pod("engine-a", ip="10.0.0.1", ready=True)
    double.state.leases["switchyard-controller"] = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "switchyard-controller", "namespace": NAMESPACE,
                     "resourceVersion": "1"},
        "spec": {"holderIdentity": "crashed-replica", "leaseDurationSeconds": 1},
    }  # fmt: skip
    port = free_port()
    settings = ControllerSettings(
        host="127.0.0.1",
        port=port,
        backend="kubernetes",
        kubernetes_api=double.url,
        kubernetes_namespace=NAMESPACE,
        leader_election=True,
        lease_duration_s=1,
    )

    async def main() -> None:
        controller = asyncio.create_task(serve(settings))
        channel = insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        stub = controller_pb2_grpc.ControllerServiceStub(channel)

        async def status(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return (await health.Check(request, wait_for_ready=True)).status

        try:
            assert await status("") == SERVING
            assert await status(SERVICE_NAME) == NOT_SERVING
            while await status(SERVICE_NAME) != SERVING:
                await asyncio.sleep(0.05)
            lease = double.lease("switchyard-controller")
            assert lease is not None and lease["spec"]["holderIdentity"] != "crashed-replica"

            replicas: list[common_pb2.Replica] = []
            while not replicas:
                replicas = list(
                    (await stub.ListReplicas(controller_pb2.ListReplicasRequest())).replicas
                )
                await asyncio.sleep(0.05)
            assert [(r.replica_id, r.address) for r in replicas] == [("engine-a", "10.0.0.1:50100")]

            reply = await stub.Scale(controller_pb2.ScaleRequest(pool="engines", replicas=3))
            assert reply.desired == 3
            while double.state.replicas != 3:
                await asyncio.sleep(0.05)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it: a clean stop
            await asyncio.wait_for(controller, timeout=10)
            await channel.close()
        lease = double.lease("switchyard-controller")
        assert lease is not None and lease["spec"]["holderIdentity"] is None  # released

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=20))
    finally:
        double.close()
