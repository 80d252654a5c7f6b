"""The daemon: packets in, events out. Orchestrates ``identifier`` and ``policy``; owns the store and the CLI."""
