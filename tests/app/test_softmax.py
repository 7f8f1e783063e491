"""The engine's host-side softmax: torch's answer in float32, and no overflow or warning on any row."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from app.engine import softmax


def test_softmax_matches_torch_row_by_row() -> None:
    logits = np.array([[0.0, 1.0, 2.0], [1000.0, 999.0, -1000.0], [-5.5, -5.5, -5.5]], dtype=np.float32)
    probs = softmax(logits.copy())
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), dim=-1).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(probs[2], np.full(3, 1 / 3, dtype=np.float32))
    np.testing.assert_allclose(probs[1, :2], [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))], rtol=1e-6)
    assert probs[1, 2] == 0.0  # exp(-2000) underflows to zero, and nothing overflowed


def test_a_non_finite_row_stays_non_finite_alone_and_warns_nothing() -> None:
    logits = np.array([[np.inf, 0.0], [np.nan, 1.0], [3.0, 1.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = softmax(logits)
    assert np.isfinite(probs).all(axis=1).tolist() == [False, False, True]
    np.testing.assert_allclose(probs[2], [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))], rtol=1e-6)
