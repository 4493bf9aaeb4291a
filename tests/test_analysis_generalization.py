"""Generalization numbers: dB/dim and bits/dim of a known difference."""
import math

import numpy as np
import pytest

from dsm_fast.analysis.generalization import BITS_PER_DB, compare_log_p, to_db_per_dim


def test_one_bit_per_dimension_is_10_log10_2_decibels():
    d = 100
    log_p_b = np.linspace(-500.0, -300.0, 7)
    log_p_a = log_p_b + d * math.log(2)  # A gives every sample twice the density per dimension: +1 bit/dim
    stats = compare_log_p(log_p_a, log_p_b, d)
    assert stats["mean_db"] == pytest.approx(10 * math.log10(2)) and stats["rms_db"] == pytest.approx(3.0103, abs=1e-4)
    assert stats["mean_bits"] == pytest.approx(1.0) and stats["mean_abs_bits"] == pytest.approx(1.0)
    assert stats["correlation"] == pytest.approx(1.0)
    assert BITS_PER_DB == pytest.approx(0.3322, abs=1e-4)
    assert to_db_per_dim(np.array([-d * math.log(10)]), d)[0] == pytest.approx(-10.0)  # p = 10^(−d): −10 dB/dim


def test_mean_abs_and_rms_of_a_signed_difference():
    stats = compare_log_p(np.array([4.0, 1.0]), np.array([1.0, 2.0]), 1)  # differences 3 and −1 nats
    k = 10 / math.log(10)
    assert stats["mean_db"] == pytest.approx(k) and stats["mean_abs_db"] == pytest.approx(2 * k)
    assert stats["rms_db"] == pytest.approx(k * math.sqrt(5))
