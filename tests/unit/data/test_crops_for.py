"""``geometry.crops_for`` (issue 20): the crops of a whole batch at once, equal to ``crop_for``
(one numpy Generator per sample, the reference every backend draws from) draw for draw."""

from __future__ import annotations

import numpy as np
import pytest

from fastmlgan.data.geometry import crop_for, crops_for


@pytest.mark.parametrize("seed, epoch", [(0, 0), (3, 1), (12345, 7), (2**32 - 1, 2**31)])
def test_crops_for_equals_crop_for(seed, epoch):
    indices = np.random.default_rng(seed % 1000).integers(0, 2**32, 2000)
    indices[:300] = np.arange(300)
    expected = np.array([crop_for(seed, epoch, int(i)) for i in indices])
    got = crops_for(seed, epoch, indices)
    assert got.dtype == np.int64 and got.shape == (2000, 2)
    assert np.array_equal(got, expected)
    # All 25 windows appear: a constant or a biased draw would not pass the comparison either.
    assert len({tuple(c) for c in got.tolist()}) == 25


def test_values_beyond_one_word():
    # More than 32 bits change SeedSequence's entropy layout: those go the plain way, same answers.
    assert np.array_equal(crops_for(2**33, 1, [5, 6]), [crop_for(2**33, 1, 5), crop_for(2**33, 1, 6)])
    assert np.array_equal(crops_for(1, 2, [2**40]), [crop_for(1, 2, 2**40)])
    assert crops_for(0, 0, []).shape == (0, 2)
