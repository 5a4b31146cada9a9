"""hpcm.data: image folders, conversions, bad images, the embedded sample split, step-pure data
order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hpcm.data import commands
from hpcm.data import images as data


def write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_folders_are_searched_recursively_for_png_and_jpeg(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    write(tmp_path / "a.png", rgb)
    write(tmp_path / "sub" / "deeper" / "b.JPG", rgb)
    write(tmp_path / "sub" / "c.jpeg", rgb)
    (tmp_path / "notes.txt").write_text("not an image")
    write(tmp_path / "d.bmp", rgb)
    names = [p.name for p in data.list_images(tmp_path)]
    assert names == [
        "a.png",
        "c.jpeg",
        "b.JPG",
    ]  # sorted by path: a.png, sub/c.jpeg, sub/deeper/b.JPG


def test_grayscale_rgba_palette_and_16bit_become_rgb8(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = data.load_rgb(write(tmp_path / "g.png", gray))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out == gray[:, :, None]).all()

    rgba = np.dstack(
        [
            np.full((4, 4), 10, np.uint8),
            np.full((4, 4), 20, np.uint8),
            np.full((4, 4), 30, np.uint8),
            np.zeros((4, 4), np.uint8),
        ]
    )
    out = data.load_rgb(write(tmp_path / "a.png", rgba))
    assert out.shape == (4, 4, 3) and (out == [10, 20, 30]).all()  # alpha dropped, colour kept

    palette = Image.fromarray(np.full((4, 4, 3), [200, 100, 50], np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    palette.save(tmp_path / "p.png")
    assert (data.load_rgb(tmp_path / "p.png") == [200, 100, 50]).all()

    deep = np.full((4, 4), 65535, np.uint16)
    Image.fromarray(deep).save(tmp_path / "d16.png")
    assert (data.load_rgb(tmp_path / "d16.png") == 255).all()  # scaled, not clipped garbage


def test_corrupt_images_fail_with_their_path_or_are_skipped(tmp_path):
    good = write(tmp_path / "good.png", np.full((80, 80, 3), 128, np.uint8))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    with pytest.raises(data.ImageError, match="garbage.png"):
        data.open_image_set(str(tmp_path), "train", "train_data")
    with pytest.warns(UserWarning, match="garbage.png"):
        images = data.open_image_set(str(tmp_path), "train", "train_data", skip_bad_images=True)
    assert images.labels == [str(good)]

    # a truncated file passes the header scan and fails at decode time
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-60])
    garbage.unlink()
    images = data.open_image_set(str(tmp_path), "train", "train_data")
    index = images.labels.index(str(truncated))
    with pytest.raises(data.ImageError, match="truncated.png"):
        data.TrainCrops(images, 64)[(index, (0, 1, 0))]
    with pytest.warns(UserWarning, match="truncated.png"):
        crop = data.TrainCrops(images, 64, skip_bad_images=True)[(index, (0, 1, 0))]
    assert crop.shape == (3, 64, 64)  # replaced by the next readable image


def test_empty_folder_and_too_small_images_name_key_and_value(tmp_path):
    with pytest.raises(data.DataConfigError, match=r"'val_data' = '.*': no PNG/JPEG"):
        data.open_image_set(str(tmp_path), "val", "val_data")
    write(tmp_path / "small.png", np.zeros((30, 50, 3), np.uint8))
    with pytest.raises(
        data.DataConfigError, match=r"'patch_size' = 64 is larger than every image.*30x50"
    ):
        data.open_image_set(str(tmp_path), "train", "train_data", min_size=64)
    write(tmp_path / "big.png", np.zeros((64, 70, 3), np.uint8))
    with pytest.warns(UserWarning, match="1 of 2 images are smaller"):
        images = data.open_image_set(str(tmp_path), "train", "train_data", min_size=64)
    assert [label.rsplit("/", 1)[-1] for label in images.labels] == ["big.png"]


def test_crops_and_flips_are_reproducible_and_cover_both_flips():
    array = np.repeat(
        np.arange(10 * 12, dtype=np.uint8).reshape(10, 12, 1), 3, axis=2
    )  # unique pixels
    a = data.random_crop_flip(array, 4, np.random.default_rng([1, 2, 3]))
    b = data.random_crop_flip(array, 4, np.random.default_rng([1, 2, 3]))
    assert a.shape == (4, 4, 3) and (a == b).all()
    # every output is a flipped crop of the input
    seen_flips = set()
    for seed in range(40):
        crop = data.random_crop_flip(array, 4, np.random.default_rng(seed))
        for flip_h in (False, True):
            for flip_v in (False, True):
                candidate = crop[:, ::-1] if flip_h else crop
                candidate = candidate[::-1] if flip_v else candidate
                top = (array[:, :, 0] == candidate[0, 0, 0]).nonzero()
                r, c = int(top[0][0]), int(top[1][0])
                if r + 4 <= 10 and c + 4 <= 12 and (array[r : r + 4, c : c + 4] == candidate).all():
                    seen_flips.add((flip_h, flip_v))
    assert seen_flips == {(False, False), (True, False), (False, True), (True, True)}


def test_data_order_is_a_pure_function_of_seed_and_step():
    full = data.StepBatchSampler(num_images=5, batch_size=3, seed=7, total_steps=10)
    resumed = data.StepBatchSampler(
        num_images=5, batch_size=3, seed=7, total_steps=10, start_step=4
    )
    batches = list(full)
    assert list(resumed) == batches[4:]
    # every epoch is a permutation: the first 15 positions (3 epochs of 5) cover each image 3 times
    flat = [index for batch in batches[:5] for index, _ in batch]
    assert sorted(flat) == sorted(list(range(5)) * 3)
    assert list(data.StepBatchSampler(5, 3, seed=8, total_steps=10)) != batches


def test_epoch_of_a_step_is_the_epoch_of_its_last_sample():
    # 10 images, batch 4: step s covers stream positions 4(s-1) .. 4s-1, epoch = position // 10
    assert [data.epoch_of(step, 4, 10) for step in range(0, 7)] == [0, 0, 0, 1, 1, 1, 2]
    sampler = data.StepBatchSampler(num_images=10, batch_size=4, seed=0, total_steps=6)
    assert [sampler.epoch_of(step) for step in range(1, 7)] == [0, 0, 1, 1, 1, 2]


def test_loader_output_does_not_depend_on_workers_or_start_step():
    images = data.open_image_set("samples", "val", "val_data")
    serial = [x for x in data.train_loader(images, 64, 2, seed=3, total_steps=3)]
    parallel = [
        x
        for x in data.train_loader(
            images, 64, 2, seed=3, total_steps=3, start_step=1, num_workers=1
        )
    ]
    assert len(serial) == 3 and len(parallel) == 2
    for a, b in zip(serial[1:], parallel):
        assert torch.equal(a, b)
    assert (
        serial[0].shape == (2, 3, 64, 64)
        and 0 <= float(serial[0].min())
        and float(serial[0].max()) <= 1
    )


def test_sample_split_is_fixed_and_disjoint():
    assert list(data.SAMPLE_SPLITS["train"]) == [
        "retina",
        "hubble_deep_field",
        "colorwheel",
        "camera",
        "coins",
        "moon",
        "brick",
        "grass",
        "gravel",
    ]
    assert list(data.SAMPLE_SPLITS["val"]) == ["immunohistochemistry"]
    # six held-out photos (the demo's test set, named in the README)
    assert list(data.SAMPLE_SPLITS["test"]) == [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "motorcycle",
        "grace_hopper",
    ]
    names = [n for split in data.SAMPLE_SPLITS.values() for n in split]
    assert len(names) == len(set(names))


def test_export_samples_cli_writes_lossless_png_folders(tmp_path):
    assert (
        commands.main(["export-samples", "--output", str(tmp_path), "--splits", "val", "test"]) == 0
    )
    for split in ("val", "test"):
        written = sorted(p.stem for p in (tmp_path / split).glob("*.png"))
        assert written == sorted(data.SAMPLE_SPLITS[split])
        for name, array in data.sample_images(split):
            assert (data.load_rgb(tmp_path / split / f"{name}.png") == array).all()
    assert not (tmp_path / "train").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
