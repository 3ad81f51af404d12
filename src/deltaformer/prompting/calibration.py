"""Contextual calibration (Zhao et al., 2021): divide out the label bias the prompt itself induces.

The prompt (with its demonstrations) is scored with content-free inputs in place of the example's text
("N/A", the empty string, "[MASK]" by default); their class probabilities, averaged, estimate the bias
``p_cf``. Calibrated scores are ``log_softmax(scores) - log p_cf``: the paper's ``W = diag(p_cf)^-1`` with
``b = 0``, in log space (a constant per example does not change the ranking).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Content-free inputs of the paper.
CONTENT_FREE = ("N/A", "", "[MASK]")


def content_free_bias(cf_scores: Tensor) -> Tensor:
    """``log p_cf`` (C,) from the class scores (K, C) of K content-free inputs: the log of their mean
    normalised class probabilities."""
    probs = cf_scores.float().softmax(-1).mean(0)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def calibrate(scores: Tensor, log_bias: Tensor) -> Tensor:
    """Calibrated log scores (N, C); ``log_bias`` is (C,) or (N, C) (one per example's demonstration set)."""
    return scores.float().log_softmax(-1) - log_bias
