"""Classical codecs as anchors: one (image, quality) measured by ``compressai.utils.bench``.

Codecs (``CODECS``): ``jpeg`` and ``webp`` (Pillow's libjpeg / libwebp, CompressAI's
``JPEG`` / ``WebP`` classes; quality 1-100) and ``vtm`` (the VVC reference software, CompressAI's
``VTM`` class; the quality is the QP, 0-63). Every number comes from CompressAI's own
``Codec.run``: the RGB -> YCbCr 4:4:4 8-bit conversion (``rgb2ycbcr``, ITU-R BT.709 full range),
the encode / decode commands, bpp = file bytes x 8 / pixels, and the RGB PSNR and MS-SSIM of the
8-bit reconstruction against the original PNG.

Two parts of CompressAI are replaced, for the duration of one VTM measurement:

- its command runner (``compressai.utils.bench.codecs.run_command``). Why: it throws away the
  encoder's log (the version string and VTM's own Y / U / V PSNR, which the anchor records) and,
  when a command fails, prints the output and calls ``sys.exit(1)``, which would end the calling
  process with no error naming the cause. The replacement runs the same command lines, keeps
  each one with its log, and raises :class:`CodecError` with the tail of the log;
- with the anchor option ``colour: round`` (the default), its two colour conversions. Why:
  CompressAI truncates RGB -> YCbCr and the decoded YCbCr -> RGB to 8 bits (``astype``), which
  on its own, with no codec in between, costs Kodak 9.3 dB of PSNR (round trip 43.66 dB against
  53.00 dB rounded) and an anchor about 1 dB at QP 22 (0.8-1.6 dB per image; docs/anchors.md).
  ``colour: truncate`` keeps CompressAI's class exactly as it is (``VTM_COLOURS``).

A missing VTM build or cfg is a :class:`CodecError` naming the config key to set
(``datasets.<dataset>.anchors.<anchor>.build_dir`` / ``.cfg``), raised by :func:`check_codec`
before anything runs.
"""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import PIL
import PIL.features
from PIL import Image

from hpcm.config.run_config import MS_SSIM_MIN_SIDE

POINT_FORMAT = "hpcm-codec-point/1"
# VTM's encoder and decoder binaries in its build's bin/ folder (CompressAI's names on Linux)
VTM_ENCODER, VTM_DECODER = "EncoderAppStatic", "DecoderAppStatic"
_YCBCR = (
    "RGB -> YCbCr 4:4:4, 8-bit (compressai.transforms.functional.rgb2ycbcr, ITU-R BT.709 "
    "full range, values {how} to 8 bits); decoded YCbCr -> RGB (ycbcr2rgb), {how} to 8 bits; "
    "PSNR / MS-SSIM on RGB against the original PNG"
)
# The colour option of a vtm anchor -> what its provenance says
VTM_COLOUR_DEFAULT = "round"
VTM_COLOURS = {
    "round": _YCBCR.format(how="rounded") + " (this project's conversion; CompressAI truncates)",
    "truncate": _YCBCR.format(how="truncated") + " (compressai.utils.bench's VTM class as is)",
}
COLOUR_PILLOW = "Pillow's own (JPEG: YCbCr 4:2:0 by default; WebP: YUV 4:2:0); metrics on RGB"
# the colour of a point: a VTM_COLOURS key, or this for the Pillow codecs
PILLOW = "pillow"
COLOURS = {**VTM_COLOURS, PILLOW: COLOUR_PILLOW}


class CodecError(ValueError):
    """A codec that cannot run as configured; the message names the config key or file."""


@dataclass(frozen=True)
class Codec:
    name: str
    quality_range: tuple[int, int]  # inclusive bounds of `qualities` (QPs for vtm)
    needs_build: bool  # options build_dir and cfg are required


CODECS = {
    "jpeg": Codec("jpeg", (1, 100), False),
    "webp": Codec("webp", (1, 100), False),
    "vtm": Codec("vtm", (0, 63), True),
}


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def vtm_binaries(build_dir: str | Path) -> tuple[Path, Path]:
    return Path(build_dir) / VTM_ENCODER, Path(build_dir) / VTM_DECODER


def check_codec(codec: str, options: dict[str, Any], key: str) -> None:
    """Refuse an unknown codec, qualities out of range, a missing VTM build or cfg; ``key`` is
    the anchor's config key (``datasets.<dataset>.anchors.<anchor>``)."""
    if codec not in CODECS:
        raise CodecError(
            f"config key '{key}.codec': unknown codec {codec!r}; choose one of {', '.join(CODECS)}"
        )
    spec = CODECS[codec]
    colour = options.get("colour")
    if colour is not None and (codec != "vtm" or colour not in VTM_COLOURS):
        raise CodecError(
            f"config key '{key}.colour': {colour!r} is not a colour conversion of {codec}; "
            + (f"choose one of {', '.join(VTM_COLOURS)}" if codec == "vtm" else "remove the key")
        )
    low, high = spec.quality_range
    bad = [q for q in options.get("qualities") or [] if not low <= int(q) <= high]
    if bad:
        raise CodecError(f"config key '{key}.qualities': {bad} outside {low}-{high} for {codec}")
    if not spec.needs_build:
        return
    build_dir = options.get("build_dir")
    if not build_dir:
        raise CodecError(
            f"config key '{key}.build_dir' is not set: name the folder holding "
            f"{VTM_ENCODER} and {VTM_DECODER} (VTM's bin/ after `make EncoderApp "
            "DecoderApp`; see docs/anchors.md)"
        )
    for binary in vtm_binaries(build_dir):
        if not binary.is_file():
            raise CodecError(
                f"config key '{key}.build_dir': VTM build not found: {binary} does "
                "not exist. Build VTM (docs/anchors.md) and set this key to the "
                "folder holding its binaries, or remove the anchor"
            )
    cfg = options.get("cfg")
    if not cfg or not Path(cfg).is_file():
        raise CodecError(
            f"config key '{key}.cfg': VTM config file not found: {cfg!r} (e.g. "
            "<VTM source>/cfg/encoder_intra_vtm.cfg)"
        )


# --------------------------------------------------------------------------------------------
# Running CompressAI's codec classes
# --------------------------------------------------------------------------------------------


@dataclass
class Command:
    argv: list[str]
    seconds: float
    output: str


@contextmanager
def recorded_commands(module) -> Iterator[list[Command]]:
    """Replace ``module.run_command`` (CompressAI's runner) by one that keeps every command and
    its log and raises :class:`CodecError` on failure (see the module docstring for why)."""
    commands: list[Command] = []
    original = module.run_command

    def run(cmd, ignore_returncodes=None):
        argv = [str(c) for c in cmd]
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        text = done.stdout.decode("utf-8", "replace")
        commands.append(Command(argv, time.perf_counter() - start, text))
        if done.returncode and done.returncode not in (ignore_returncodes or ()):
            raise CodecError(
                f"command failed (exit {done.returncode}): {' '.join(argv)}\n{text[-2000:]}"
            )
        return text

    module.run_command = run
    try:
        yield commands
    finally:
        module.run_command = original


@contextmanager
def rounded_colour(module) -> Iterator[None]:
    """Make CompressAI's VTM class round its two 8-bit colour conversions (see the module
    docstring for why). The class converts with ``module.rgb2ycbcr`` / ``module.ycbcr2rgb`` and
    then truncates ``x * 255`` with ``astype(np.uint8)``; each replacement returns
    ``(round(255 f(x)) + 0.5) / 255``, whose truncation is ``round(255 f(x))`` (values out of
    0-255 are clipped by the class as before)."""
    import torch  # why: CompressAI's conversions take and give torch tensors

    originals = module.rgb2ycbcr, module.ycbcr2rgb

    def rounding(convert):
        return lambda x: (torch.round(convert(x) * 255.0) + 0.5) / 255.0

    module.rgb2ycbcr, module.ycbcr2rgb = (rounding(f) for f in originals)
    try:
        yield
    finally:
        module.rgb2ycbcr, module.ycbcr2rgb = originals


VERSION_RE = re.compile(r"VTM (?:Encoder|Decoder) Version (\S+)")
# VTM-22.0's totals: a header "Total Frames |  Bitrate  Y-PSNR  U-PSNR  V-PSNR  YUV-PSNR", then
# "<frames>  a  <bitrate>  <Y>  <U>  <V>  <YUV>" (the first block: all frames of layer 0)
TOTALS_RE = re.compile(
    r"Total Frames \|\s+Bitrate\s+Y-PSNR\s+U-PSNR\s+V-PSNR\s+YUV-PSNR[^\n]*\n"
    r"\s*\d+\s+a\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
)


def parse_vtm_log(text: str) -> dict[str, Any]:
    """Version and the totals line (bitrate, Y, U, V, YUV PSNR) of a VTM encoder log."""
    version = VERSION_RE.search(text)
    summary = TOTALS_RE.search(text)
    if version is None or summary is None:
        raise CodecError(
            "VTM encoder log has no 'VTM Encoder Version' line or no 'Total "
            f"Frames' totals; is this VTM? Log tail:\n{text[-1500:]}"
        )
    _, y, u, v, yuv = (float(g) for g in summary.groups())
    return {
        "version": f"VTM {version.group(1)}",
        "psnr_y": y,
        "psnr_u": u,
        "psnr_v": v,
        "psnr_yuv_vtm": yuv,
    }


def _pillow_version(codec: str) -> str:
    library = {"jpeg": "jpg", "webp": "webp"}[codec]
    return f"Pillow {PIL.__version__}, lib{codec} {PIL.features.version(library)}"


def _metrics_for(path: Path) -> list[str]:
    """MS-SSIM's 5 scales need >= MS_SSIM_MIN_SIDE pixels per side (as hpcm.evaluate)."""
    with Image.open(path) as image:
        small = min(image.size) < MS_SSIM_MIN_SIDE
    return ["psnr-rgb"] if small else ["psnr-rgb", "ms-ssim-rgb"]


def measure(
    codec: str, options: dict[str, Any], image: str | Path, quality: int, key: str
) -> dict[str, Any]:
    """One (image, quality) through CompressAI's codec class: a point record (``POINT_FORMAT``)."""
    import compressai.utils.bench.codecs as bench  # why: imports torch (~1 s); measuring only

    check_codec(codec, {**options, "qualities": [quality]}, key)
    image = Path(image)
    if not image.is_file():
        raise CodecError(f"image not found: {image}")
    with Image.open(image) as opened:
        width, height = opened.size
    metrics = _metrics_for(image)
    record: dict[str, Any] = {
        "format": POINT_FORMAT,
        "codec": codec,
        "quality": int(quality),
        "image_sha256": sha256_of(image),
        "width": width,
        "height": height,
    }
    if codec == "vtm":
        build_dir, cfg = options["build_dir"], options["cfg"]
        colour = options.get("colour") or VTM_COLOUR_DEFAULT
        runner = bench.VTM(SimpleNamespace(build_dir=str(build_dir), config=str(cfg), rgb=False))
        conversion = rounded_colour(bench) if colour == "round" else nullcontext()
        with recorded_commands(bench) as commands, conversion:
            info = runner.run(str(image), int(quality), metrics)
        encode, decode = commands
        record.update(parse_vtm_log(encode.output))
        record.update(
            cfg=str(cfg),
            cfg_sha256=sha256_of(cfg),
            colour=colour,
            encode_cmd=" ".join(encode.argv),
            decode_cmd=" ".join(decode.argv),
        )
    else:
        runner = {"jpeg": bench.JPEG, "webp": bench.WebP}[codec](SimpleNamespace())
        info = runner.run(str(image), int(quality), metrics)
        record.update(
            version=_pillow_version(codec),
            colour=PILLOW,
            encode_cmd=f"PIL.Image.save(format={runner.fmt!r}, quality={int(quality)})",
            decode_cmd="PIL.Image.open().load()",
        )
    pixels = width * height
    record.update(
        bytes=int(round(info["bpp"] * pixels / 8)),
        bpp=float(info["bpp"]),
        psnr=float(info["psnr-rgb"]),
        ms_ssim=float(info.get("ms-ssim-rgb", math.nan)),
        enc_time=float(info["encoding_time"]),
        dec_time=float(info["decoding_time"]),
        compressai_class=f"compressai.utils.bench.codecs.{type(runner).__name__}",
    )
    return record


def yuv_psnr(record: dict[str, Any]) -> float:
    """(6 Y + U + V) / 8 of VTM's own PSNRs (the video CTC weighting); NaN without them."""
    if not all(k in record for k in ("psnr_y", "psnr_u", "psnr_v")):
        return math.nan
    return (6 * record["psnr_y"] + record["psnr_u"] + record["psnr_v"]) / 8
