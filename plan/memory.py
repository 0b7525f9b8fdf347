"""Transitional: the memory predictor moved to train/memory.py (measurement: train/memory_measure.py).

Kept only so plan/check.py and tests/test_optimizers.py import until their owners switch to
train.memory; delete it then.
"""

from train.memory import GIB, MemoryEstimate, param_counts, predict_memory, predict_run_memory  # noqa: F401
from train.memory_measure import measure_peak_memory  # noqa: F401
