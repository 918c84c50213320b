"""Paired accuracy statistics of two engines on the same images (the tuner's and bench's).

One sign convention: loss = accuracy of the reference - accuracy of the new engine, so a
positive loss is accuracy lost. d_i = [ref_i correct] - [new_i correct] in {-1, 0, 1};
loss = mean(d), se = std(d, ddof=1) / sqrt(n); the one-sided upper bound is loss + z * se
(z at `confidence`), the two-sided interval loss -/+ z2 * se.
"""
import math
import statistics

import numpy as np


def z_value(confidence, two_sided=False):
    """Normal quantile of a one-sided (or two-sided) bound at `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    p = 1.0 - (1.0 - confidence) / 2.0 if two_sided else confidence
    return statistics.NormalDist().inv_cdf(p)


def paired(correct_ref, correct_new, confidence=0.95, se_scale=1.0, clamp=True, unit=1.0):
    """Paired comparison of two boolean vectors (is each image right?) on the same images.

    Returns n, n_rw (right -> wrong), n_wr (wrong -> right), and, multiplied by `unit`
    (1: fractions, 100: percentage points): acc_ref, acc_new, loss, se, ucb = loss + z * se,
    ci_low / ci_high (two-sided at `confidence`) and gate = max(loss, 0) + z * se * se_scale
    (a search's acceptance bound: a measured gain is not banked unless clamp is False;
    se_scale projects the SE to another number of images).
    """
    right_ref = np.asarray(correct_ref, bool).ravel()
    right_new = np.asarray(correct_new, bool).ravel()
    if len(right_ref) != len(right_new):
        raise ValueError("paired statistics need the same images for both engines")
    n = len(right_ref)
    if n == 0:
        raise ValueError("paired statistics need at least one image")
    n_rw = int(np.sum(right_ref & ~right_new))
    n_wr = int(np.sum(~right_ref & right_new))
    mean = (n_rw - n_wr) / n
    var = max(0.0, (n_rw + n_wr - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    se = math.sqrt(var / n)
    z1, z2 = z_value(confidence), z_value(confidence, two_sided=True)
    return {"n": n, "n_rw": n_rw, "n_wr": n_wr,
            "acc_ref": unit * float(np.mean(right_ref)),
            "acc_new": unit * float(np.mean(right_new)),
            "loss": unit * mean, "se": unit * se, "ucb": unit * (mean + z1 * se),
            "gate": unit * ((max(mean, 0.0) if clamp else mean) + z1 * se * se_scale),
            "ci_low": unit * (mean - z2 * se), "ci_high": unit * (mean + z2 * se)}


def topk_correct(scores, labels, k):
    """Whether each row of `scores` has its label among its k highest scores."""
    if k == 1:
        return scores.argmax(axis=1) == labels
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)
