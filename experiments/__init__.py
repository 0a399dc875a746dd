"""Hydra entry points around modlora: train, calibrate, evaluate and sweep steering adapters.

``python -m experiments.train`` trains a bidirectional steering adapter (default: the embedded
all-MiniLM-L6-v2 and the embedded sentiment set, offline, a few minutes on a CPU) and writes an
``adapter.safetensors``, ``metrics.json``, a plot and a log into its Hydra run folder.
"""
