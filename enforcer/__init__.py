"""enforcer: an mTLS-terminating TCP/TLS proxy (sidecar, gateway, benchmark harness)."""

__version__ = "0.1.0"
