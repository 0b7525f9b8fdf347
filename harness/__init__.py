"""lm-evaluation-harness on our own model: the LM adapter, task lookup (local folders, the registry), running tasks.

Below train/, so training can run the tasks every EVAL_EVERY steps; evaluation/ ('make eval') uses it too.
"""
