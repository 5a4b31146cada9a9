"""The validation images of a run, checked at its start, and a validation a stopped run still owes.

Checked before the model is built (``check_validation_images``), as the training images are: every
validation image is decoded once (a file with a readable header but a broken body is refused
here, naming the file, not at the first validation after hours of training; ``skip_bad_images``
drops it with a warning instead), and with ``distortion: ms_ssim`` every one must be at least
``MS_SSIM_MIN_SIDE`` px on each side (pytorch_msssim's 5 scales of an 11-tap window).

A pending validation: the loop (``hpcm.train.loop``) validates after the step that ends a
``val_every`` window and after the last step. When an image turns out unreadable there, the step's
weights are saved (its work is kept) but the step is unfinished: no metrics.csv row, no best-model
update. The run keeps the row logged so far in ``Run.pending_row`` and its checkpoint stores it
under ``PENDING_KEY``; the resumed run validates that step first, writes the whole row, and only
then trains on (or finishes): otherwise a run stopped at its last step would export weights that
were never validated as ``epoch_best``.
"""

from __future__ import annotations

import warnings
from typing import Any

from hpcm.config.run_config import MS_SSIM_MIN_SIDE, RunConfig
from hpcm.data.images import DataConfigError, ImageError, ImageSet

PENDING_KEY = "pending_validation"  # training-state key: the row of a step whose validation failed


def check_validation_images(images: ImageSet, cfg: RunConfig) -> ImageSet:
    """``images`` (run-config key ``val_data``) with every image decoded once and, for ms_ssim,
    large enough; raises ImageError / DataConfigError naming the key, the file and what to do."""
    source = cfg.val_data
    keep = []
    for index in range(len(images.labels)):
        try:
            images.load(index)
        except ImageError as exc:
            if not cfg.skip_bad_images:
                raise ImageError(
                    f"run config: key 'val_data' = {source!r}: {exc}; fix or remove "
                    "the image (or set skip_bad_images)"
                ) from None
            warnings.warn(f"skipping unreadable validation image: {exc}", stacklevel=2)
            continue
        keep.append(index)
    if not keep:
        raise DataConfigError(
            f"run config: key 'val_data' = {source!r}: no readable validation image"
        )
    if cfg.distortion == "ms_ssim":
        small = [i for i in keep if min(images.sizes[i]) < MS_SSIM_MIN_SIDE]
        if small:
            height, width = images.sizes[small[0]]
            raise DataConfigError(
                f"run config: key 'val_data' = {source!r}: {len(small)} of {len(keep)} validation "
                f"image(s) smaller than {MS_SSIM_MIN_SIDE} px on a side, e.g. "
                f"{images.labels[small[0]]} ({height}x{width} px); distortion ms_ssim (5-scale "
                f"MS-SSIM) needs at least {MS_SSIM_MIN_SIDE} x {MS_SSIM_MIN_SIDE} px: use larger "
                "validation images"
            )
    if len(keep) == len(images):
        return images
    return ImageSet(
        labels=[images.labels[i] for i in keep],
        sizes=[images.sizes[i] for i in keep],
        paths=None if images.paths is None else [images.paths[i] for i in keep],
        arrays=None if images.arrays is None else [images.arrays[i] for i in keep],
    )


def pending_row(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The metrics row of the checkpoint's step whose validation failed, or None (also for
    checkpoints written before this key existed)."""
    return None if state is None else state.get(PENDING_KEY)
