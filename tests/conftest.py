"""Shared pytest set-up.

Tests run on CPU with small tensors; one thread per process keeps 2-rank tests from fighting over
the 2 cores (docs/platform_notes.md: 2 threads per rank made a small model 10x slower).
"""
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs (minutes); the README test command runs them too")
