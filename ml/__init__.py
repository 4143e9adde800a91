"""CRM precision marketing: ingestion, warehouse, training, scoring and publishing (see README.md)."""

import os

# OpenMP threads (scikit-learn's tree models and k-means) that find no free core sleep instead of spinning.
# libgomp reads this once, when scikit-learn first loads it, so it is set here, before any of our modules
# imports scikit-learn. The nightly runs three tasks at once on two cores: with the default policy a scoring
# task's idle threads spun for a third of its CPU time (1M customers, beside two busy processes: value
# scoring 44-45 s wall / 38-41 CPU s, passive 36-38 s / 27.5 CPU s; alone on the machine 18.8 s against 18.5 s).
# A deployment's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
