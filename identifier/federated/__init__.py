"""Federated retraining across homes with secure aggregation, on Flower (SecAgg+).

A library: Flower's ServerApp (``server_app``) and ClientApp (``client_app``), the model seam (``model``),
clipped deltas and model publishing (``updates``), home datasets (``homedata``) and the process launcher
(``processes``) shared by the CLI, the tests and the benchmark. Nothing here imports ``gateway`` or ``webui``.
"""
