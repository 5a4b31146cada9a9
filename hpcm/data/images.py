"""Training and validation images: image folders, the embedded sample set, random crops.

Image folders are searched recursively for PNG and JPEG files (sorted, so the order is the same on
every machine). Every image is decoded to 8-bit RGB: grayscale is replicated to three channels,
RGBA / LA drop their alpha, palette images are expanded, 16-bit images are scaled to 8 bits.
A file that cannot be read raises :class:`ImageError` naming the path, or, with
``skip_bad_images``, is skipped with a warning.

The embedded sample set is a handful of photos shipped inside scikit-image (no download), split
once and for all into train / val / test (:data:`SAMPLE_SPLITS`). ``hpcm data
export-samples --output DIR`` writes the three splits as PNG folders (``DIR/train``, ``DIR/val``,
``DIR/test``) for the Snakemake data rule.

Data order is a pure function of ``(seed, step)``: :class:`StepBatchSampler` yields, for each step,
the image indices of the batch and a per-sample seed that fixes the crop position and flips. A run
resumed at step ``s`` therefore sees exactly the batches an uninterrupted run sees, whatever the
number of DataLoader workers.
"""

from __future__ import annotations

import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from hpcm.util.io import atomic_open

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


class DataConfigError(ValueError):
    """A dataset that cannot serve the run (empty, or no image as large as the patch)."""


# ----------------------------------------------------------------------------- reading images


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Decode a PIL image to an (H, W, 3) uint8 array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") would clip at 255, so scale down first.
        array = np.asarray(image, dtype=np.uint32)
        scale = 257 if array.max(initial=0) > 255 else 1
        gray = (array // scale).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8; raise ImageError naming the file on any failure."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb8(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {str(path)!r}: {exc}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only; raise ImageError naming the file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {str(path)!r}: {exc}") from None
    return height, width


def list_images(root: str | Path) -> list[Path]:
    """All PNG/JPEG files under ``root`` (recursively, sorted)."""
    root = Path(root)
    if root.is_file():
        return [root] if root.suffix.lower() in IMAGE_EXTENSIONS else []
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    # load_rgb's arrays can be read-only views of PIL's buffer; torch wants writable memory.
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


# ----------------------------------------------------------------------------- embedded samples


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data  # why: slow to import (~1 s); only the embedded sample set needs it

        array = np.asarray(getattr(skimage.data, name)())
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        return np.ascontiguousarray(array[:, :, :3]).astype(np.uint8)

    return load


def _motorcycle_left() -> np.ndarray:
    import skimage.data  # why: slow to import (~1 s); only the embedded sample set needs it

    return np.ascontiguousarray(skimage.data.stereo_motorcycle()[0]).astype(np.uint8)


def _matplotlib_sample(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook  # why: loads matplotlib only when a sample photo is read

        return load_rgb(matplotlib.cbook.get_sample_data(filename, asfileobj=False))

    return load


# Fixed split of photos shipped inside installed packages (scikit-image, matplotlib; never
# downloaded). Train and val hold no everyday colour photo, so that all six of them can be the
# held-out test set: training sees textures, grayscale photos and colour astronomy / retina
# images; the val image (a colour microscopy slide) only picks the best checkpoint.
SAMPLE_SPLITS: dict[str, dict[str, Callable[[], np.ndarray]]] = {
    "train": {
        name: _skimage(name)
        for name in (
            "retina",
            "hubble_deep_field",
            "colorwheel",
            "camera",
            "coins",
            "moon",
            "brick",
            "grass",
            "gravel",
        )
    },
    "val": {"immunohistochemistry": _skimage("immunohistochemistry")},
    "test": {
        "astronaut": _skimage("astronaut"),
        "chelsea": _skimage("chelsea"),
        "coffee": _skimage("coffee"),
        "rocket": _skimage("rocket"),
        "motorcycle": _motorcycle_left,
        "grace_hopper": _matplotlib_sample("grace_hopper.jpg"),
    },
}


def sample_images(split: str) -> list[tuple[str, np.ndarray]]:
    """The embedded sample images of one split as (name, (H, W, 3) uint8) pairs."""
    if split not in SAMPLE_SPLITS:
        raise ValueError(f"unknown sample split {split!r} (valid: {', '.join(SAMPLE_SPLITS)})")
    return [(name, load()) for name, load in SAMPLE_SPLITS[split].items()]


def export_samples(
    output: str | Path, splits: Sequence[str] = ("train", "val", "test")
) -> list[Path]:
    """Write each split as PNG files under ``output/<split>/<name>.png`` (atomic writes)."""
    written = []
    for split in splits:
        for name, array in sample_images(split):
            path = Path(output) / split / f"{name}.png"
            with atomic_open(path, "wb") as handle:
                Image.fromarray(array).save(handle, format="PNG")
            written.append(path)
    return written


# ----------------------------------------------------------------------------- datasets


@dataclass
class ImageSet:
    """Images of one dataset: either file paths (decoded on demand) or in-memory arrays."""

    labels: list[str]
    sizes: list[tuple[int, int]]
    paths: list[Path] | None = None
    arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        if self.arrays is not None:
            return self.arrays[index]
        assert self.paths is not None
        return load_rgb(self.paths[index])


def open_image_set(
    source: str, split: str, key: str, skip_bad_images: bool = False, min_size: int = 0
) -> ImageSet:
    """Scan a folder (or the ``samples`` split) and keep the images at least ``min_size`` on each
    side.

    Raises DataConfigError naming ``key`` and ``source`` when nothing usable remains.
    """
    if source == "samples":
        pairs = sample_images(split)
        image_set = ImageSet(
            labels=[f"samples:{split}/{n}" for n, _ in pairs],
            sizes=[a.shape[:2] for _, a in pairs],
            arrays=[a for _, a in pairs],
        )
    else:
        files = list_images(source)
        if not files:
            raise DataConfigError(f"run config: key {key!r} = {source!r}: no PNG/JPEG images found")
        labels, sizes, paths = [], [], []
        for path in files:
            try:
                sizes.append(image_size(path))
            except ImageError as exc:
                if not skip_bad_images:
                    raise ImageError(
                        f"run config: key {key!r} = {source!r}: {exc}; fix or remove "
                        "the image (or set skip_bad_images)"
                    ) from None
                warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
                continue
            labels.append(str(path))
            paths.append(path)
        if not paths:
            raise DataConfigError(f"run config: key {key!r} = {source!r}: no readable images")
        image_set = ImageSet(labels=labels, sizes=sizes, paths=paths)

    if min_size > 0:
        keep = [i for i, (h, w) in enumerate(image_set.sizes) if min(h, w) >= min_size]
        if not keep:
            largest = max(image_set.sizes, key=min)
            raise DataConfigError(
                f"run config: key 'patch_size' = {min_size!r} is larger than every image in {key} "
                f"= {source!r} (largest usable image is {largest[0]}x{largest[1]})"
            )
        if len(keep) < len(image_set):
            warnings.warn(
                f"{key} = {source!r}: {len(image_set) - len(keep)} of {len(image_set)} images are "
                f"smaller than patch_size {min_size} and are not used",
                stacklevel=2,
            )
            image_set = ImageSet(
                labels=[image_set.labels[i] for i in keep],
                sizes=[image_set.sizes[i] for i in keep],
                paths=None if image_set.paths is None else [image_set.paths[i] for i in keep],
                arrays=None if image_set.arrays is None else [image_set.arrays[i] for i in keep],
            )
    return image_set


def random_crop_flip(array: np.ndarray, patch: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random ``patch`` x ``patch`` crop, then horizontal and vertical flips (each p =
    0.5)."""
    height, width = array.shape[:2]
    top = int(rng.integers(0, height - patch + 1))
    left = int(rng.integers(0, width - patch + 1))
    crop = array[top : top + patch, left : left + patch]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    return crop


class TrainCrops(torch.utils.data.Dataset):
    """Random crops with flips. Indexed by ``(image_index, sample_seed)`` so augmentation is
    reproducible."""

    def __init__(self, images: ImageSet, patch_size: int, skip_bad_images: bool = False):
        self.images = images
        self.patch_size = patch_size
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, tuple[int, ...]]) -> torch.Tensor:
        index, sample_seed = item
        rng = np.random.default_rng(list(sample_seed))
        for attempt in range(len(self.images)):
            candidate = (index + attempt) % len(self.images)
            try:
                array = self.images.load(candidate)
            except ImageError as exc:
                if not self.skip_bad_images:
                    raise
                # Deterministic replacement (the next image) keeps the data order a function of
                # (seed, step).
                warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
                continue
            if min(array.shape[:2]) < self.patch_size:
                raise ImageError(
                    f"image {self.images.labels[candidate]!r} is "
                    f"{array.shape[0]}x{array.shape[1]}, smaller than patch_size {self.patch_size} "
                    "(its header said otherwise)"
                )
            return to_tensor(random_crop_flip(array, self.patch_size, rng))
        raise ImageError(
            f"no readable image left in the training set (last tried {self.images.labels[index]!r})"
        )


def epoch_of(step: int, batch_size: int, num_images: int) -> int:
    """The epoch the last sample of ``step`` belongs to (step 0, before any training: epoch 0)."""
    return max(0, (step * batch_size - 1) // num_images)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches for steps ``start_step+1 .. total_steps`` as lists of ``(image_index, sample_seed)``.

    The images form one endless stream of per-epoch permutations (epoch ``e`` is permuted by
    ``default_rng([seed, e])``); step ``s`` takes positions ``(s-1)*B .. s*B-1`` of that stream, so
    a batch may straddle two epochs. Every sample's crop and flips come from ``(seed, s, j)``.
    Data-parallel training: rank ``r`` of ``world_size`` takes rows ``r*B/W .. (r+1)*B/W - 1`` of
    each step's global batch (``batch_size`` is the global batch; j stays the global row).
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(
                f"batch_size {batch_size} must split evenly over world_size {world_size} "
                f"(rank {rank})"
            )
        self.rows = range(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step
        self._perm_cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
            }
        return self._perm_cache[epoch]

    def batch(self, step: int) -> list[tuple[int, tuple[int, ...]]]:
        out = []
        for j in self.rows:
            position = (step - 1) * self.batch_size + j
            epoch, offset = divmod(position, self.num_images)
            out.append((int(self._permutation(epoch)[offset]), (self.seed, step, j)))
        return out

    def epoch_of(self, step: int) -> int:
        return epoch_of(step, self.batch_size, self.num_images)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
        for step in range(self.start_step + 1, self.total_steps + 1):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM/SIGINT to the main process, which saves and exits.

    SLURM and Ctrl-C signal the whole process group; a worker dying first would crash the loop
    before it could save.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(
    images: ImageSet,
    patch_size: int,
    batch_size: int,
    seed: int,
    total_steps: int,
    start_step: int = 0,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """DataLoader over the remaining steps of a run (this rank's rows of each global batch); its
    order does not depend on ``num_workers``."""
    sampler = StepBatchSampler(
        len(images), batch_size, seed, total_steps, start_step, rank, world_size
    )
    return torch.utils.data.DataLoader(
        TrainCrops(images, patch_size, skip_bad_images),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
        # A private generator: the loader must not draw from the global torch RNG (resume
        # exactness).
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if num_workers > 0 else None,
    )


def validation_images(
    image_set: ImageSet, skip_bad_images: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (label, (1, 3, H, W) tensor) for every validation image, in order."""
    for index, label in enumerate(image_set.labels):
        try:
            array = image_set.load(index)
        except ImageError as exc:
            if not skip_bad_images:
                raise
            warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
            continue
        yield label, to_tensor(array).unsqueeze(0)
