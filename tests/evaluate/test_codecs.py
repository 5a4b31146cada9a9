"""Codec anchors measured through compressai.utils.bench: numbers against an independent Pillow +
numpy computation, the missing-VTM errors, VTM's log, and (where a VTM build exists) the same
numbers as CompressAI's own VTM class."""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpcm.data.images import sample_images
from hpcm.evaluate import codecs
from hpcm.evaluate.codec_anchor import collect, read_point, write_point

VTM_BIN = Path(os.environ.get("HPCM_VTM_BIN", "/work/vtm/src/bin"))
VTM_CFG = Path(os.environ.get("HPCM_VTM_CFG", "/work/vtm/src/cfg/encoder_intra_vtm.cfg"))
HAS_VTM = all(p.is_file() for p in codecs.vtm_binaries(VTM_BIN)) and VTM_CFG.is_file()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    name, array = next(iter(sample_images("test")))
    path = tmp_path_factory.mktemp("img") / f"{name}.png"
    Image.fromarray(array[:176, :200]).save(path)  # >= 161 px: MS-SSIM is measured
    return path


def reference_jpeg(path: Path, quality: int) -> tuple[int, float]:
    """Bytes and RGB PSNR of Pillow's JPEG, computed here without CompressAI."""
    original = Image.open(path).convert("RGB")
    buffer = io.BytesIO()
    original.save(buffer, format="jpeg", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=float)
    mse = np.mean((decoded - np.asarray(original, dtype=float)) ** 2)
    return len(buffer.getvalue()), 10 * math.log10(255.0**2 / mse)


@pytest.mark.parametrize("quality", [15, 75])
def test_jpeg_point_equals_pillow_and_numpy(photo, quality):
    record = codecs.measure("jpeg", {}, photo, quality, "datasets.d.anchors.jpeg")
    size, psnr = reference_jpeg(photo, quality)
    assert record["bytes"] == size
    assert record["bpp"] == pytest.approx(size * 8 / (200 * 176), rel=1e-12)
    assert record["psnr"] == pytest.approx(psnr, abs=1e-4)  # CompressAI computes in float32
    assert 0.5 < record["ms_ssim"] < 1.0
    assert record["version"].startswith("Pillow ") and "libjpeg" in record["version"]
    assert record["compressai_class"].endswith(".JPEG")


def test_webp_point_is_measured_by_compressai_webp(photo):
    record = codecs.measure("webp", {}, photo, 50, "k")
    assert record["compressai_class"].endswith(".WebP") and record["bytes"] > 0
    assert record["psnr"] > 25


def test_missing_vtm_build_names_the_key(tmp_path):
    key = "datasets.kodak.anchors.vtm-22.0"
    with pytest.raises(codecs.CodecError, match=rf"'{key}.build_dir'.*EncoderAppStatic"):
        codecs.check_codec("vtm", {"build_dir": str(tmp_path / "nope"), "cfg": "x"}, key)
    with pytest.raises(codecs.CodecError, match=rf"'{key}.build_dir' is not set"):
        codecs.check_codec("vtm", {"cfg": "x"}, key)
    for binary in codecs.vtm_binaries(tmp_path):
        binary.write_text("")
    with pytest.raises(codecs.CodecError, match=rf"'{key}.cfg'"):
        codecs.check_codec("vtm", {"build_dir": str(tmp_path), "cfg": str(tmp_path / "a.cfg")}, key)
    with pytest.raises(codecs.CodecError, match=rf"'{key}.qualities': \[64\]"):
        codecs.check_codec("vtm", {"qualities": [37, 64]}, key)
    with pytest.raises(codecs.CodecError, match=r"unknown codec 'bpg'"):
        codecs.check_codec("bpg", {}, key)


def test_failed_command_raises_instead_of_exiting():
    import compressai.utils.bench.codecs as bench

    with codecs.recorded_commands(bench) as commands:
        with pytest.raises(codecs.CodecError, match=r"exit 3.*sh -c"):
            bench.run_command(["sh", "-c", "echo broken; exit 3"])
    assert commands[0].output == "broken\n"
    assert bench.run_command.__module__ == "compressai.utils.bench.codecs"  # restored


def test_point_files_collect_into_csv_and_json(photo, tmp_path):
    paths = []
    for quality in (20, 60):
        record = codecs.measure("jpeg", {}, photo, quality, "k")
        record.update(dataset="d", anchor="jpeg", image=photo.name)
        paths.append(write_point(record, tmp_path / f"q{quality}.json"))
    (tmp_path / "broken.json").write_text("{")
    assert read_point(tmp_path / "broken.json")[0] is None
    csv, doc_path = collect(
        [*paths, tmp_path / "broken.json"], tmp_path / "a.csv", tmp_path / "a.json"
    )
    doc = json.loads(doc_path.read_text())
    bpps = [reference_jpeg(photo, q)[0] * 8 / (200 * 176) for q in (20, 60)]
    assert doc["results"]["bpp"] == pytest.approx(bpps)
    assert doc["meta"]["quality"] == [20, 60]
    assert doc["meta"]["complete"]["pairs"] == 2 and doc["meta"]["complete"]["expected_pairs"] == 3
    assert doc["meta"]["provenance"]["codec"] == "jpeg"


def test_collect_refuses_an_anchor_that_mixes_colour_conversions(photo, tmp_path):
    paths = []
    for quality, colour in ((20, "round"), (60, "truncate")):
        record = codecs.measure("jpeg", {}, photo, quality, "k")
        record.update(dataset="d", anchor="vtm-x", image=photo.name, colour=colour)
        paths.append(write_point(record, tmp_path / f"q{quality}.json"))
    with pytest.raises(
        ValueError, match=r"d/vtm-x mixes colour conversions \['round', 'truncate'\]"
    ):
        collect(paths, tmp_path / "a.csv", tmp_path / "a.json")


# Lines of a real VTM-22.0 encoder log (this build, a 64 x 64 crop at QP 47), abridged
VTM_LOG_TAIL = (
    "VVCSoftware: VTM Encoder Version 22.0 [Linux][GCC 12.2.0][64 bit] [SIMD=AVX2] \n"
    "POC    0 LId:  0 TId: 0 ( IDR_N_LP, I-SLICE, QP 47 )       1000 bits [Y 28.0720 dB    "
    "U 31.9254 dB    V 40.3972 dB] [ET    18 ] [L0] [L1]\n\n"
    "LayerId  0\n"
    "\tTotal Frames |  Bitrate      Y-PSNR   U-PSNR   V-PSNR   YUV-PSNR \n"
    "\t1            a  0.1250       28.0720  31.9254  40.3972  31.1691  \n"
)


def test_vtm_log_parsing():
    parsed = codecs.parse_vtm_log(VTM_LOG_TAIL)
    assert parsed == {
        "version": "VTM 22.0",
        "psnr_y": 28.072,
        "psnr_u": 31.9254,
        "psnr_v": 40.3972,
        "psnr_yuv_vtm": 31.1691,
    }
    assert codecs.yuv_psnr(parsed) == pytest.approx((6 * 28.072 + 31.9254 + 40.3972) / 8)
    with pytest.raises(codecs.CodecError, match="is this VTM"):
        codecs.parse_vtm_log("no summary here")


@pytest.mark.skipif(
    not HAS_VTM, reason=f"no VTM build at {VTM_BIN} (set HPCM_VTM_BIN / HPCM_VTM_CFG)"
)
def test_vtm_point_equals_compressai_vtm_class(tmp_path):
    """Our recorded run with ``colour: truncate`` and CompressAI's own class give the same
    numbers on a small crop."""
    from types import SimpleNamespace

    import compressai.utils.bench.codecs as bench

    name, array = next(iter(sample_images("test")))
    path = tmp_path / "crop.png"
    Image.fromarray(array[:64, :64]).save(path)
    options = {"build_dir": str(VTM_BIN), "cfg": str(VTM_CFG), "colour": "truncate"}
    record = codecs.measure("vtm", options, path, 47, "k")
    theirs = bench.VTM(SimpleNamespace(build_dir=str(VTM_BIN), config=str(VTM_CFG), rgb=False)).run(
        str(path), 47, ["psnr-rgb"]
    )
    assert record["bpp"] == theirs["bpp"] and record["psnr"] == theirs["psnr-rgb"]
    assert record["version"] == "VTM 22.0"
    assert record["cfg_sha256"] == codecs.sha256_of(VTM_CFG)
    assert "--InputChromaFormat=444" in record["encode_cmd"] and "-q 47" in record["encode_cmd"]
    assert math.isfinite(record["psnr_y"])


def test_recorded_colour_conversion_is_compressais():
    """The provenance says BT.709 full range, truncated to 8 bits: check both against CompressAI
    itself. Pure red's luma is Kr = 0.2126 under BT.709 (0.299 under BT.601), and the VTM class
    converts with ``astype(np.uint8)`` (truncation) and no rounding; if CompressAI changes either,
    the recorded text (and docs/anchors.md's measured cost of the truncation) is wrong."""
    import inspect

    import torch
    from compressai.transforms.functional import rgb2ycbcr
    from compressai.utils.bench.codecs import VTM

    assert all("BT.709" in text for text in codecs.VTM_COLOURS.values())
    assert "truncated" in codecs.VTM_COLOURS["truncate"]
    red = torch.tensor([1.0, 0.0, 0.0]).reshape(3, 1, 1)
    assert rgb2ycbcr(red)[0].item() == pytest.approx(0.2126, abs=1e-6)
    source = inspect.getsource(VTM._run_impl)
    assert "astype(np.uint8)" in source and "round" not in source


# A lossless stand-in for VTM's two binaries: the "bitstream" is the YCbCr file itself, so what
# CompressAI's VTM class measures is its colour conversion alone. It prints a real log's lines.
LOSSLESS_VTM = """#!{python}
import shutil, sys
args = sys.argv[1:]
if "-i" in args:
    shutil.copyfile(args[args.index("-i") + 1], args[args.index("-b") + 1])
    sys.stdout.write({log!r})
else:
    shutil.copyfile(args[args.index("-b") + 1], args[args.index("-o") + 1])
"""


def lossless_vtm(folder: Path) -> dict:
    """The options of a VTM anchor whose binaries are ``LOSSLESS_VTM`` in ``folder``/vtm-bin: what
    it measures is the colour conversion alone."""
    bin_dir = folder / "vtm-bin"
    bin_dir.mkdir()
    for name in (codecs.VTM_ENCODER, codecs.VTM_DECODER):
        (bin_dir / name).write_text(LOSSLESS_VTM.format(python=sys.executable, log=VTM_LOG_TAIL))
        (bin_dir / name).chmod(0o755)
    cfg = folder / "encoder_intra_vtm.cfg"
    cfg.write_text("# not read by the stand-in\n")
    return {"codec": "vtm", "qualities": [37], "build_dir": str(bin_dir), "cfg": str(cfg)}


def numpy_round_trip(rgb8: np.ndarray, to_8bit) -> np.ndarray:
    """RGB -> YCbCr (ITU-R BT.709 full range) -> 8 bits -> RGB -> 8 bits, written here from the
    standard's coefficients, without CompressAI or torch."""
    kr, kb = 0.2126, 0.0722
    r, g, b = np.moveaxis(rgb8.astype(np.float64) / 255, -1, 0)
    y = kr * r + (1 - kr - kb) * g + kb * b
    ycc = np.stack([y, (b - y) / (2 - 2 * kb) + 0.5, (r - y) / (2 - 2 * kr) + 0.5])
    y, cb, cr = to_8bit(np.clip(ycc, 0, 1) * 255) / 255
    r, b = y + (2 - 2 * kr) * (cr - 0.5), y + (2 - 2 * kb) * (cb - 0.5)
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return to_8bit(np.clip(np.stack([r, g, b], -1), 0, 1) * 255)


@pytest.mark.parametrize("colour, to_8bit", [("round", np.round), ("truncate", np.floor)])
def test_vtm_colour_conversion_equals_numpy(photo, tmp_path, colour, to_8bit):
    """``colour: round`` rounds both conversions, ``truncate`` is CompressAI's class as is: the
    RGB PSNR of a lossless round trip through the class equals the numpy round trip's. Measured
    on this photo: rounded 52.94 dB, truncated 43.69 dB. Tolerance 0.03 dB: CompressAI computes
    in float32, numpy here in float64; 271 of 105,600 values land on the other side of a rounding
    boundary (1-2 levels), 0.011 dB (round) and 0.019 dB (truncate). BT.601 coefficients instead
    would move the PSNR by 0.10 dB (round) and 0.25 dB (truncate)."""
    options = {**lossless_vtm(tmp_path), "colour": colour}
    record = codecs.measure("vtm", options, photo, 22, "k")
    rgb8 = np.asarray(Image.open(photo).convert("RGB"))
    mse = np.mean((numpy_round_trip(rgb8, to_8bit) - rgb8) ** 2)
    assert record["psnr"] == pytest.approx(10 * math.log10(255.0**2 / mse), abs=0.03)
    assert record["colour"] == colour
    assert record["psnr"] > 50 if colour == "round" else record["psnr"] < 46


def test_unknown_vtm_colour_names_the_key(tmp_path):
    with pytest.raises(codecs.CodecError, match=r"'k.colour'.*round, truncate"):
        codecs.check_codec("vtm", {"colour": "nearest"}, "k")
    with pytest.raises(codecs.CodecError, match=r"'k.colour'.*remove the key"):
        codecs.check_codec("jpeg", {"colour": "round"}, "k")
