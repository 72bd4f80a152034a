"""The controller: the replica registry and its health, the routing table that gateways follow,
and what keeps the engine pool at its desired size: the reconcile loop over the local backend
(engine processes on this machine), or the Kubernetes backend, which follows the engine
Deployment's pods and scale subresource (with an optional autoscaler and leader election)."""
