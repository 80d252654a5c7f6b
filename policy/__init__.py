"""Per-device filtering policy: rules, block lists, schedules, learned profiles, decisions, enforcement.

A library: it defines the records it takes and returns and imports nothing from ``gateway`` or ``webui``.
"""
