"""Ablation presets: the exact values of issue 3, usable as HierarchicalBalanced arguments."""

import pytest
import torch

from hpcm.config.presets import (
    STUDY1_SCALE_WEIGHTS,
    STUDY2_GAMMAS,
    ablation_overrides,
    preset_value,
)
from hpcm.optim import HierarchicalBalanced


def test_study_values_are_the_issue_values():
    assert {k: v["scale_weights"] for k, v in STUDY1_SCALE_WEIGHTS.items()} == {
        "equal": [0.33, 0.33, 0.34],
        "s1_emphasis": [0.5, 0.3, 0.2],
        "s2_emphasis": [0.3, 0.4, 0.3],
        "s3_emphasis": [0.2, 0.3, 0.5],
    }
    assert {k: v["gammas"] for k, v in STUDY2_GAMMAS.items()} == {
        "uniform": [0.006] * 3,
        "increasing": [0.004, 0.006, 0.008],
        "decreasing": [0.008, 0.006, 0.004],
    }


def test_every_preset_builds_an_optimizer_and_lookups_validate():
    for name in STUDY1_SCALE_WEIGHTS:
        opt = HierarchicalBalanced(
            [torch.zeros(1, requires_grad=True)], **ablation_overrides("study1_scale_weights", name)
        )
        assert opt.scale_weights == STUDY1_SCALE_WEIGHTS[name]["scale_weights"]
    for name in STUDY2_GAMMAS:
        g1, g2, g3 = ablation_overrides("study2_gammas", name)["gammas"]
        opt = HierarchicalBalanced(
            [torch.zeros(1, requires_grad=True)], gamma_s1=g1, gamma_s2=g2, gamma_s3=g3
        )
        assert list(opt.scale_gammas.values()) == pytest.approx([g1, g2, g3])
    with pytest.raises(ValueError, match="study2_gammas"):
        ablation_overrides("study3", "x")
    with pytest.raises(ValueError, match="uniform"):
        ablation_overrides("study2_gammas", "flat")


def test_a_preset_name_stands_for_its_values_under_its_key_only():
    assert preset_value("scale_weights", "equal") == [0.33, 0.33, 0.34]
    assert preset_value("gammas", "increasing") == [0.004, 0.006, 0.008]
    assert preset_value("gammas", [0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]  # numbers pass through
    assert preset_value("optimizer", "equal") == "equal"  # not a preset key
    preset_value("gammas", "uniform").append(1.0)  # a copy: the table stays intact
    assert STUDY2_GAMMAS["uniform"]["gammas"] == [0.006] * 3
    with pytest.raises(ValueError, match="'equal' of study2_gammas"):
        preset_value("gammas", "equal")


def test_seed_defaults_are_the_seed_values():
    """The seed's HierarchicalBalanced / ScaleGammaManager defaults, spelled as the seed spells
    them."""
    import torch

    from hpcm.optim import HierarchicalBalanced
    from hpcm.train.schedules import ScaleGammaManager

    opt = HierarchicalBalanced([torch.nn.Parameter(torch.zeros(2))])
    assert opt.task_gammas.tolist() == pytest.approx([0.008, 0.008, 0.006, 0.006, 0.004])
    assert opt.scale_weights == pytest.approx([0.3, 0.4, 0.3])
    assert ScaleGammaManager(strategy="fixed", total_epochs=10).initial_gammas == pytest.approx(
        {"s1": 0.008, "s2": 0.006, "s3": 0.004}
    )
