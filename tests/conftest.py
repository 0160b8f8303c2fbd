"""Shared fixtures: the committed testbed model and tiny checkpoints of every family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vllm_moe_prune.testbed import TESTBED_MODEL

# Engines started by the tests keep their KV cache small; this machine has 2 cores.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
torch.set_num_threads(1)  # 2 cores: leave one to the vLLM engine a test may run


@pytest.fixture(scope="session")
def testbed() -> Path:
    return TESTBED_MODEL


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny family checkpoints are generated, once per test session."""
    return tmp_path_factory.mktemp("tiny-checkpoints")
