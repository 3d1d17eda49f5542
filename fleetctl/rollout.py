"""`fleetctl rollout ...` subcommands (the rollout service fills these in)."""


def add_parser(subparsers) -> None:
    """Register the `rollout` subcommand group on fleetctl's top-level subparsers."""
