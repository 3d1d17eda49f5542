"""fleetctl: the CI and operator command-line client for the modelfleet REST API (stdlib only)."""

__version__ = "0.1.0"
