"""Device identification: features, model, streaming decision, training, evaluation, federated learning.

A library: it takes observation records (``identifier.observation``) and returns identities. It imports
nothing from ``gateway``, ``policy`` or ``webui``.
"""
