"""What every Switchyard service shares: settings, logging, gRPC and metrics helpers, the
demo checkpoint, and the generated wire stubs under :mod:`switchyard.v1`."""

__version__ = "0.1.0"
