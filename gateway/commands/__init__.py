"""Command groups of ``iotgw``; each module registers its subcommands with ``add_commands(subparsers)``."""
