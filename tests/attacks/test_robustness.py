"""Survivors over increasing radii and the word-level worst case, against direct counts."""

from __future__ import annotations

import pytest
import torch

from advfunc.attacks.robustness import chunks, survivors_over_radii, worst_case


def test_survivors_match_a_direct_count_and_only_standing_examples_are_attacked():
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(37, generator=generator) > 0.2
    breaks_at = torch.rand(37, generator=generator)  # example i breaks under any radius >= breaks_at[i]
    radii = [0.6, 0.1, 0.3]
    asked = []

    def holds(indices, radius):
        assert all(clean[i] for i in indices), "a broken example was attacked again"
        asked.append((radius, list(indices)))
        return breaks_at[indices] > radius

    standing = survivors_over_radii(clean, radii, holds, lambda indices: chunks(indices, 5))
    assert list(standing) == sorted(radii)
    for radius in radii:
        assert standing[radius] == pytest.approx(float((clean & (breaks_at > radius)).float().mean()))
    assert [radius for radius, _ in asked] == sorted(r for r, _ in asked), "radii run in increasing order"
    assert all(len(indices) <= 5 for _, indices in asked)


def test_the_worst_case_counts_an_example_only_when_every_attack_missed_it():
    assert worst_case([[True, True, False, True], [True, False, True, True]]) == 0.5
    assert worst_case([[True, False]]) == 0.5
    with pytest.raises(ValueError, match="different numbers of examples"):
        worst_case([[True], [True, False]])
