"""The controller: the replica registry and its health, the routing table that gateways follow,
and the reconcile loop that keeps the engine pool at its desired size through a backend
(local processes now; Kubernetes later)."""
