"""The paper's evaluation: Rouge-L over seeds, exact match, Dist-4, exposure bias, calibration, reports.

Submodules are imported on use (`from minillm.evaluation.runner import evaluate_models`) so that the
pure metrics do not pull in models, sampling and plotting.
"""
