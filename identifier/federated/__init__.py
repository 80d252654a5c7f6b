"""Federated retraining across homes with secure aggregation, on Flower (SecAgg+).

A library: Flower's ServerApp (``server_app``) and ClientApp (``client_app``, training in ``home_client``), the
model seam (``model``), clipped deltas and model publishing (``updates``), home datasets (``homedata``) and the
process launcher (``processes``) shared by the CLI, the tests and the benchmark. Flower's own processes with
shorter waits: ``supernode``, ``warm_clientapp`` and ``clientapp_process``; ``localfleet`` is a SuperLink and N
homes on loopback. Measurements: ``simulate`` (federated against centralized) and ``leakage`` (what an update
reveals). Nothing here imports ``gateway`` or ``webui``.
"""
