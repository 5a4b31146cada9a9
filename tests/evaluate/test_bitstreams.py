"""End-to-end evaluation of HPCM_Tiny on two photos that ship with the dependencies (the held-out
sample photos, skimage's coffee and matplotlib's motorcycle; centre crops to keep CPU time low), so
that it runs on a clone without ../shared."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcm.data.images import sample_images

CROP = 176  # > 160 so that 5-scale MS-SSIM is defined; padded to 192 by the model
NAMES = sorted(f"{name}.png" for name, _ in sample_images("test"))  # the held-out sample photos


def _centre_crop(image: np.ndarray, dst: Path) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - CROP) // 2, (w - CROP) // 2
    crop = np.ascontiguousarray(image[top : top + CROP, left : left + CROP])
    Image.fromarray(crop).save(dst)
    return crop


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from hpcm.evaluate.bitstreams import main
    from hpcm.models import build_model, with_run_metadata

    root = tmp_path_factory.mktemp("eval")
    data = root / "photos"
    data.mkdir()
    originals = {
        f"{name}.png": _centre_crop(image, data / f"{name}.png")
        for name, image in sample_images("test")
    }
    assert sorted(originals) == NAMES
    run_dir = root / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    model = build_model("HPCM_Tiny")
    # Official layout: a raw state dict, the labels in its metadata (as hpcm.train saves it);
    # a run.yaml beside it that says otherwise is not read.
    torch.save(
        with_run_metadata(
            model.state_dict(), model="HPCM_Tiny", variant="phase1", lmbda=0.0067, seed=3
        ),
        run_dir / "epoch_best.pth.tar",
    )
    (run_dir / "run.yaml").write_text("model: HPCM_Small\nvariant: baseline\nlmbda: 0.0483\n")
    out_csv, out_json, recon = root / "out.csv", root / "out.json", root / "recon"
    code = main(
        [
            "--checkpoint",
            str(run_dir / "epoch_best.pth.tar"),
            "--dataset",
            str(data),
            "--output",
            str(out_csv),
            "--json",
            str(out_json),
            "--dataset-name",
            "photos",
            "--save-reconstructions",
            str(recon),
        ]
    )
    assert code == 0
    with open(out_csv) as handle:
        rows = list(csv.DictReader(handle))
    return {
        "rows": rows,
        "json": out_json,
        "recon": recon,
        "originals": originals,
        "data": data,
        "run_dir": run_dir,
        "root": root,
    }


def test_rows_metadata_and_decode_check(run):
    rows = run["rows"]
    assert [r["image"] for r in rows] == NAMES
    for row in rows:
        assert (row["variant"], float(row["lmbda"]), row["seed"], row["dataset"], row["model"]) == (
            "phase1",
            0.0067,
            "3",
            "photos",
            "HPCM_Tiny",
        )
        assert (int(row["width"]), int(row["height"])) == (CROP, CROP)
        assert row["decode_ok"] == "True"
        assert float(row["decode_max_abs_diff"]) < 1 / 255
        assert float(row["enc_time"]) > 0 and float(row["dec_time"]) > 0


def test_bpp_counts_bitstream_bytes_over_original_pixels(run):
    from hpcm.data.images import load_rgb, to_tensor
    from hpcm.models import load_checkpoint, pad_image

    for row in run["rows"]:
        total = int(row["bytes_y"]) + int(row["bytes_z"])
        assert float(row["bpp"]) == pytest.approx(total * 8 / CROP**2, rel=1e-12)
        bits = sum(float(row[k]) for k in ("bits_s1", "bits_s2", "bits_s3", "bits_z"))
        assert float(row["bpp_est"]) == pytest.approx(bits / CROP**2, rel=1e-9)
    # Independent byte count for one image: compress it here, outside hpcm.evaluate.
    model = load_checkpoint(run["run_dir"] / "epoch_best.pth.tar", "HPCM_Tiny")
    model.update(force=True)
    x = to_tensor(load_rgb(run["data"] / NAMES[1])).unsqueeze(0)
    with torch.no_grad():
        enc = model.compress(pad_image(x, model.pad_multiple)[0])
    n_bytes = sum(len(s) for strings in enc["strings"] for s in strings)
    assert int(run["rows"][1]["bytes_y"]) + int(run["rows"][1]["bytes_z"]) == n_bytes


def _decode_here(run_dir: Path, original: np.ndarray) -> np.ndarray:
    """Compress and decode ``original`` with the checkpoint, outside hpcm.evaluate: 8-bit RGB."""
    from hpcm.models import load_checkpoint

    model = load_checkpoint(run_dir / "epoch_best.pth.tar", "HPCM_Tiny")
    model.update(force=True)
    x = torch.from_numpy(original.astype(np.float32) / 255).permute(2, 0, 1)[None]
    multiple = model.pad_multiple
    height, width = x.shape[-2:]
    # CompressAI's convention: zero padding centred on the image.
    extra_h, extra_w = -height % multiple, -width % multiple
    top, left = extra_h // 2, extra_w // 2
    padded = torch.nn.functional.pad(x, (left, extra_w - left, top, extra_h - top))
    with torch.no_grad():
        enc = model.compress(padded)
        decoded = model.decompress(enc["strings"], enc["shape"])["x_hat"]
    decoded = decoded[..., top : top + height, left : left + width].clamp(0, 1)
    return (decoded[0].permute(1, 2, 0).numpy().astype(np.float64) * 255).round()


def test_psnr_and_ms_ssim_on_8bit_output_match_independent_computation(run):
    from pytorch_msssim import ms_ssim

    for row in run["rows"]:
        original = run["originals"][row["image"]].astype(np.float64)
        decoded = _decode_here(run["run_dir"], run["originals"][row["image"]])
        mse = np.mean((original - decoded) ** 2)
        assert float(row["psnr"]) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-9)
        a = torch.from_numpy(original).permute(2, 0, 1)[None].float() / 255
        b = torch.from_numpy(decoded).permute(2, 0, 1)[None].float() / 255
        expected = ms_ssim(a, b, data_range=1.0).item()
        assert float(row["ms_ssim"]) == pytest.approx(expected, abs=1e-5)
        assert float(row["ms_ssim_db"]) == pytest.approx(-10 * math.log10(1 - expected), abs=1e-3)
        # --save-reconstructions writes exactly the decoded image the metrics saw.
        saved = np.asarray(Image.open(run["recon"] / row["image"])).astype(np.float64)
        np.testing.assert_array_equal(saved, decoded)


def test_json_is_compressai_format_and_readable_by_its_plot(run, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from compressai.utils.plot.__main__ import main as plot_main
    from compressai.utils.plot.__main__ import parse_json_file

    doc = json.loads(run["json"].read_text())
    assert doc["description"] == "Inference (ans)"
    rows = run["rows"]
    # CompressAI aggregation: arithmetic mean of per-image values (PSNR averaged in dB).
    assert doc["results"]["psnr-rgb"] == [pytest.approx(np.mean([float(r["psnr"]) for r in rows]))]
    assert doc["results"]["bpp"] == [pytest.approx(np.mean([float(r["bpp"]) for r in rows]))]
    parsed = parse_json_file(run["json"], "psnr")
    assert parsed["name"] == doc["name"] and parsed["ys"] == doc["results"]["psnr-rgb"]
    png = tmp_path / "rd.png"
    plot_main(["-f", str(run["json"]), "-o", str(png), "--backend", "matplotlib"])
    assert png.stat().st_size > 0


def test_json_is_strict_when_a_metric_was_not_measured(run, tmp_path):
    from compressai.utils.plot.__main__ import parse_json_file

    from hpcm.evaluate.bitstreams import main

    # 64 px images: too small for 5-scale MS-SSIM.
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(run["originals"][NAMES[1]][:64, :64]).save(small / "a.png")
    ckpt = run["run_dir"] / "epoch_best.pth.tar"
    out_json = tmp_path / "small.json"
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--dataset",
                str(small),
                "--output",
                str(tmp_path / "small.csv"),
                "--json",
                str(out_json),
                "--model",
                "HPCM_Tiny",
            ]
        )
        == 0
    )

    def reject(constant):
        raise AssertionError(f"bare {constant} in the JSON")

    doc = json.loads(out_json.read_text(), parse_constant=reject)
    assert "ms-ssim-rgb" not in doc["results"] and doc["meta"]["not_measured"] == ["ms-ssim-rgb"]
    assert doc["meta"]["lmbda"] == 0.0067 and doc["meta"]["seed"] == 3
    parsed = parse_json_file(out_json, "psnr")
    assert parsed["ys"] == doc["results"]["psnr-rgb"] and math.isfinite(parsed["ys"][0])


def test_rd_points_from_the_evaluation_csv(run):
    from hpcm.analysis.points import rd_points

    points = rd_points([run["root"] / "out.csv"])
    assert len(points) == 1
    point = points.iloc[0]
    assert (point["dataset"], point["variant"], point["lmbda"], point["n_images"]) == (
        "photos",
        "phase1",
        0.0067,
        len(NAMES),
    )
    assert point["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in run["rows"]]))
    assert bool(point["decode_ok"])


def test_clear_errors(run, tmp_path, capsys):
    from hpcm.evaluate.bitstreams import main

    ckpt = str(run["run_dir"] / "epoch_best.pth.tar")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["--checkpoint", ckpt, "--dataset", str(empty), "--output", str(tmp_path / "a.csv")])
        == 2
    )
    assert f"no PNG/JPEG images found under {empty}" in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    assert (
        main(["--checkpoint", ckpt, "--dataset", str(bad), "--output", str(tmp_path / "b.csv")])
        == 2
    )
    assert "broken.png" in capsys.readouterr().err

    assert (
        main(
            [
                "--checkpoint",
                ckpt,
                "--dataset",
                str(run["data"]),
                "--output",
                str(tmp_path / "c.csv"),
                "--model",
                "HPCM_Small",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not fit HPCM_Small" in err and "key" in err and "drop --model" in err
    assert not any(tmp_path.glob("*.csv"))  # nothing half-written
