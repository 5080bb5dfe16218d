from __future__ import annotations

import math

import pytest

from kvcomm.errors import LayerSelectionError
from kvcomm.selection import (
    calibrate, combine, contiguous_layers, gaussian_prior, layer_count, min_max, parse_layers, random_layers,
    top_layers,
)
from kvcomm.tasks import get_task


def test_prior_shape_and_normalisation():
    prior = gaussian_prior(30, mu=0.5, sigma=10.0)
    assert len(prior) == 30 and min(prior) == 0.0 and max(prior) == pytest.approx(1.0)
    assert prior[0] == pytest.approx(prior[29])  # symmetric about (L-1)/2 = 14.5
    assert prior[14] == prior[15] == max(prior)
    raw = [math.exp(-((l - 14.5) ** 2) / 200) for l in range(30)]
    assert prior == pytest.approx(min_max(raw))
    shifted = gaussian_prior(30, mu=0.0, sigma=5.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0


def test_layer_count_uses_ceiling():
    assert [layer_count(r, 28) for r in (0.3, 0.5, 0.7)] == [9, 14, 20]
    assert [layer_count(r, 32) for r in (0.3, 0.5, 0.7)] == [10, 16, 23]
    assert [layer_count(r, 30) for r in (0.3, 0.5, 0.7)] == [9, 15, 21]  # 0.7*30 = 21.000000000000004
    assert layer_count(0.01, 30) == 1 and layer_count(1.0, 30) == 30
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(LayerSelectionError):
            layer_count(bad, 30)


def test_top_layers_ties_are_deterministic():
    assert top_layers([0.5, 0.9, 0.5, 0.5, 0.1], 2) == (0, 1)
    assert top_layers([0.2] * 6, 3) == (0, 1, 2)
    assert top_layers([0.1, 0.3, 0.2], 3) == (0, 1, 2)


def test_combine_mixes_normalised_importance_with_prior():
    scores = combine([0.2, 0.6, 0.4, 0.2], alpha=0.5, mu=0.0, sigma=1.0)
    assert scores.normalized == pytest.approx([0.0, 1.0, 0.5, 0.0])
    expected = [0.5 * s + 0.5 * p for s, p in zip(scores.normalized, scores.prior)]
    assert scores.combined == pytest.approx(expected)
    assert combine([0.3, 0.3, 0.3]).normalized == [0.0, 0.0, 0.0]
    with pytest.raises(LayerSelectionError):
        combine([0.1, 0.2], alpha=1.5)


def test_random_and_contiguous_and_parsed_layers():
    assert random_layers(30, 9, seed=1) == random_layers(30, 9, seed=1)
    assert random_layers(30, 9, seed=1) != random_layers(30, 9, seed=2)
    assert len(set(random_layers(30, 9))) == 9
    assert contiguous_layers(3, 6, 30) == (3, 4, 5, 6)
    assert parse_layers("0,4-6, 9", 30) == (0, 4, 5, 6, 9)
    for bad in ("", "a,b", "5-3", "0,30", "-1"):
        with pytest.raises(LayerSelectionError):
            parse_layers(bad, 30)


def test_calibration_scores_are_in_unit_interval_and_saved(tiny, tmp_path):
    split = get_task("demo").load()
    scores = calibrate(tiny, tiny, split.calibration[:2])
    assert len(scores.importance) == tiny.num_layers
    assert all(0.0 <= value <= 1.0 for value in scores.importance)
    assert all(0.0 <= value <= 1.0 for value in scores.normalized + scores.combined)
    assert max(scores.normalized) == pytest.approx(1.0)
    assert scores.calibration_ids == [e.id for e in split.calibration[:2]]
    assert not set(scores.calibration_ids) & {e.id for e in split.test}
    scores.save(tmp_path / "s.json")
    assert type(scores).load(tmp_path / "s.json") == scores
    assert len(scores.select(0.5)) == 2
