"""Checkpoint loading: official raw state dicts, prefixes, legacy releases, own files, wrong
architecture."""

from __future__ import annotations

import warnings

import pytest
import torch

from hpcm.models import (
    CheckpointError,
    build_model,
    infer_model_name,
    load_checkpoint,
    save_checkpoint,
)
from tests.fixtures.hpcm_support import init_like_golden, single_thread

one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def tiny():
    model = init_like_golden(build_model("HPCM_Tiny")).eval()
    with torch.no_grad():
        for i, p in enumerate(model.adaptive_params_list):
            p.fill_(1.0 + 0.01 * i)  # distinguishable from the default ones
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_raw_state_dict_with_module_prefix(tiny, tmp_path):
    path = tmp_path / "dp.pth.tar"
    torch.save({f"module.{k}": v for k, v in tiny.state_dict().items()}, path)
    with pytest.warns(UserWarning, match="preset defaults"):
        loaded = load_checkpoint(path)  # name inferred from shapes
    assert loaded.name == "HPCM_Tiny" and not loaded.training
    assert_same_weights(loaded, tiny)
    assert load_checkpoint(path, name="HPCM_Tiny").name == "HPCM_Tiny"


def test_legacy_release_without_adaptive_params(tiny, tmp_path):
    path = tmp_path / "legacy.pth.tar"
    state = {
        k: v for k, v in tiny.state_dict().items() if not k.startswith("adaptive_params_list.")
    }
    torch.save(state, path)
    with pytest.warns(UserWarning, match="adaptive_params_list"):
        loaded = load_checkpoint(path, name="HPCM_Tiny")
    for p in loaded.adaptive_params_list:
        assert torch.equal(p, torch.ones_like(p))
    assert torch.equal(loaded.g_a.branch[0].weight, tiny.g_a.branch[0].weight)


def test_current_release_loads_without_warning(tiny, tmp_path):
    path = tmp_path / "current.pth.tar"
    torch.save(tiny.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_checkpoint(path, name="HPCM_Tiny")
    assert torch.equal(loaded.adaptive_params_list[9], tiny.adaptive_params_list[9])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path)  # inferred: only the "defaults assumed" warning, no legacy one
    assert [str(w.message) for w in caught if "adaptive_params_list" in str(w.message)] == []
    assert any("preset defaults" in str(w.message) for w in caught)


def test_wrong_architecture_names_first_mismatching_key(tiny, tmp_path):
    other = build_model("HPCM_Tiny", analysis_blocks=(1, 1, 2))
    path = tmp_path / "other.pth.tar"
    torch.save(other.state_dict(), path)
    # first key where the layouts differ, found independently by walking both key lists
    ours = list(tiny.state_dict())
    theirs = other.state_dict()
    first = next(
        k for k in ours if k not in theirs or theirs[k].shape != tiny.state_dict()[k].shape
    )
    with pytest.raises(CheckpointError, match=first.replace(".", r"\.")):
        load_checkpoint(path, name="HPCM_Tiny")
    with pytest.raises(CheckpointError, match="match no known architecture"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="means_hyper"):
        load_checkpoint(path, name="HPCM_Small")


def test_non_finite_weights_are_refused_naming_the_tensor(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    key = next(k for k, v in state.items() if k.startswith("g_s") and v.is_floating_point())
    state[key].view(-1)[0] = float("nan")
    path = tmp_path / "diverged.pth.tar"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="diverged") as info:
        load_checkpoint(path, name="HPCM_Tiny")
    assert str(path) in str(info.value) and key in str(info.value)


def test_unknown_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="HPCM_Base"):
        load_checkpoint(bad, name="HPCM_Nope")


def test_own_checkpoint_with_tables_and_overrides(tmp_path):
    model = init_like_golden(build_model("HPCM_Tiny", attn_windows=(1, 1, 2))).eval()
    model.update()
    path = tmp_path / "own.pth.tar"
    save_checkpoint(model, path, step=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config travels with the file: nothing is assumed
        loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    x = torch.rand(1, 3, 64, 64)
    enc = model.compress(x)  # the loaded tables decode the original's stream
    assert torch.equal(
        loaded.decompress(enc["strings"], enc["shape"])["x_hat"],
        model.decompress(enc["strings"], enc["shape"])["x_hat"],
    )
    # a file without the config (nested training checkpoint, or a raw state dict as epoch_best):
    # the window override cannot be recovered from shapes; inferring the name says so loudly
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "epoch": 3}, tmp_path / "train.pth.tar"
    )
    torch.save(model.state_dict(), tmp_path / "raw.pth.tar")
    for file in ("train.pth.tar", "raw.pth.tar"):
        with pytest.warns(
            UserWarning, match=r"HPCM_Tiny.*preset defaults \(attn_windows=\(1, 2, 4\)"
        ):
            assert load_checkpoint(tmp_path / file).config.attn_windows == (1, 2, 4)
    # naming the preset is the caller's explicit choice of its defaults: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(
            tmp_path / "train.pth.tar", name="HPCM_Tiny"
        ).config.attn_windows == (1, 2, 4)


def test_infer_official_architectures_from_shapes():
    for name in ("HPCM_Base", "HPCM_Large"):
        with torch.device("meta"):
            state = build_model(name).state_dict()
        assert infer_model_name(state) == name
