"""Fixtures of the inference tests (helpers live in inference_helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest
from inference_helpers import ODD_SHAPE


@pytest.fixture
def label_volume() -> np.ndarray:
    """An odd-shaped label map with three classes, touching the volume's border on one side."""
    rng = np.random.default_rng(7)
    label = np.zeros(ODD_SHAPE, dtype=np.uint8)
    label[2:10, 3:9, 1:6] = 1
    label[5:13, 0:4, 2:7] = 2
    label[rng.random(ODD_SHAPE) < 0.05] = 2
    return label
