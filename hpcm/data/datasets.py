"""Evaluation datasets: Kodak, CLIC 2020 professional validation and Tecnick, verified by SHA-256.

Kodak (24 PNGs, 768x512 / 512x768) is pinned per file: the SHA-256 of the original r0k.us bytes
(orchestration.md §5.1). CLIC 2020 professional validation (41 PNGs) is pinned as its zip
archive (third-party pin seen in several public repositories; the name matches the Google-storage
mirror, which is tried first). Entries named ``._*`` or under ``__MACOSX/`` (macOS resource forks)
are dropped; the images are written flat into the output folder together with ``SHA256SUMS``
(hashes of the extracted files) so a prepared folder can be re-verified without the archive.

Preparation always verifies before anything appears under the output path: files are gathered
in a sibling staging folder and moved into place only when every checksum matched. A mismatch
raises ``ChecksumError`` naming the file and both hashes, and removes the staging folder.

CLI (``hpcm data``, :mod:`hpcm.data.commands`; the kinds are :data:`DATASET_KINDS`)::

    hpcm data prepare kodak --source DIR_OR_URL --output DIR [--only kodim01.png,...]
        --source: a folder (searched recursively for kodimNN.png), a .zip/.tar archive, or a
        base URL (default https://r0k.us/graphics/kodak/kodak/); --only: a subset (tests, demos).
    hpcm data prepare clic2020-professional --source ZIP_OR_URL_OR_DIR --output DIR
        --source: the validation zip (path or URL; default: the pinned mirrors), or a folder
        holding that zip. The zip is checked against the pinned SHA-256 before extraction.
    hpcm data verify kodak|clic2020-professional DIR
        Re-check a prepared folder (Kodak: pinned hashes; CLIC: its SHA256SUMS).

    hpcm data prepare tecnick --source ZIP_OR_DIR --output DIR [--manifest FILE]
        --source: TESTIMAGES' testimages.zip (SourceForge, OLD/OLD_SAMPLING) or a folder holding
        its RGB/RGB_OR_1200x1200 images; no download (see "Tecnick" below).
    hpcm data verify tecnick DIR [--manifest FILE]

An already prepared and verified output is left as it is (re-running is a no-op).

Tecnick (TESTIMAGES, as HPCM and most learned-codec papers use it): the 100 images
RGB_OR_1200x1200_001.png .. _100.png (1200x1200 RGB) of the folder RGB/RGB_OR_1200x1200 of
https://sourceforge.net/projects/testimages/files/OLD/OLD_SAMPLING/testimages.zip. No SHA-256 of
these files is published (neither by TESTIMAGES nor by the papers), so none is written here. The
manifest is pinned on first use instead:
1. ``prepare tecnick`` checks names, count (100), size (1200x1200) and mode (RGB) and writes the
   folder's ``SHA256SUMS``; the archive's own SHA-256 is printed, to compare with colleagues.
2. Pin it: copy that file to ``hpcm/data/tecnick.sha256`` (ships with the package) or keep it and
   pass ``--manifest FILE``. From then on every ``prepare``/``verify`` checks each image against
   it and a differing file is a ``ChecksumError`` naming it.
Until a manifest is pinned, ``prepare`` says so on stderr every time (trust on first use).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from hpcm.util.io import sha256_file

KODAK_URL = "https://r0k.us/graphics/kodak/kodak/"
KODAK_SHA256 = {
    "kodim01.png": "a56e27cbf5f843c048b6af1d6e090760e9c92fadba88b7dee0205918a37523bd",
    "kodim02.png": "4f4b74a79237e311d72cad958237b5f7088d8bce1c82305ebefe1a70e3022dfd",
    "kodim03.png": "e25ca1ff2f0c0cb5fdfd5f9b0a0bb21ac4c3de3c84a67f35b09a85d3306249db",
    "kodim04.png": "e3b946107c5d3441c022f678d0c3caf1e224d81b1604ba840a4f88e562de61aa",
    "kodim05.png": "10349e963c5c813d327852f82c1795fa4148d69fedffc4c589bee458e3ac3d53",
    "kodim06.png": "363510303b715d4cbc384e1ce227e466b613a09e1b71ae985882bf8e7fbd9b18",
    "kodim07.png": "b77d3f006f42414bb242222e0482e750c0fb9e5ee8d4bed2f6f11c5605fe54a4",
    "kodim08.png": "ba23983c76b4832ee0e8af0592664756841a16779acd69f792e268fb6d13d6e7",
    "kodim09.png": "6a4361c2fc194feb4edaa9f9a4a0620fb9943e460ac7fdf037fb0f6dd6607a7d",
    "kodim10.png": "9dfb70f5867c29ff9ed6313683f19b3d867849e40fbc0c4c54a4a89df341cf23",
    "kodim11.png": "7936814b58b5387fce2e4e2488b4ec830dadd95fa9520f358ddb30990b50f2b6",
    "kodim12.png": "d78c37c2f04f23761ed2367dd77e2db584ddd4c3950833fecf89f199a8126980",
    "kodim13.png": "bc34a3ce58dea09dce1704c997171602de90cb34d0c8503a988b77f473d39b08",
    "kodim14.png": "55a94550ff18f3246c4074fd32b77b0c74447c26b6ad274d564d999c0450ba6e",
    "kodim15.png": "7538cbb80cb9103606c48b806eae57d56c885c7f90b9b3be70a41160f9cbb683",
    "kodim16.png": "a89c7268ccd4718ba424a99fc4643c572cf692ca6eae887185ceb4e9f11d2e54",
    "kodim17.png": "37afcc89fbdcb76d9518e04b2fc011027e2f4cd14b3b2f83cefd721641a47c5b",
    "kodim18.png": "1a9258c365988961d87a0598725b609139c303ad48a5aad6c503c3b1a87849aa",
    "kodim19.png": "b7450b264b1b0a411390d8931b112c27905a992520fc90569dc4b920aa32bbdc",
    "kodim20.png": "3b46c71e3b92a563820ba32936be8330c586c41f938efd94be938386aae4328a",
    "kodim21.png": "ac958597c82073f6bb65129c68f72b651db5b9efd82e11547d07350214bc268b",
    "kodim22.png": "1cee58eb1f2d9c7ebb254d208a03c783ce6cf2c4d8c2cf45e235dd23b4ce1b29",
    "kodim23.png": "e3111a2fd4da24af15d6459ef9eacfe54106b38e27b4a21821b75c3f5d2d5baf",
    "kodim24.png": "1071c68372cc5a01435c2c225a5cf7d4bb803846ec08bb6b3d6721b156d7cb96",
}

CLIC_PRO_VALID_ZIP_NAMES = ("clic2020_professional_valid.zip", "professional_valid_2020.zip")
CLIC_PRO_VALID_URLS = (
    "https://storage.googleapis.com/clic_datasets/clic2020_professional_valid.zip",
    "https://data.vision.ee.ethz.ch/cvl/clic/professional_valid_2020.zip",
)
CLIC_PRO_VALID_SHA256 = "e56568e20ead6bd215b313fed260d1c98b9ba863540039f00892ab67b1e39baf"
CLIC_PRO_VALID_IMAGES = 41
MANIFEST = "SHA256SUMS"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the pinned value."""

    def __init__(self, name: str, expected: str, actual: str, origin: str = "") -> None:
        where = f" (from {origin})" if origin else ""
        super().__init__(
            f"checksum mismatch for {name}{where}: expected SHA-256 {expected}, got {actual}"
        )
        self.name, self.expected, self.actual = name, expected, actual


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file", "ftp")


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` into ``target`` with a progress bar (the caller verifies the bytes)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=Path(target).name, leave=False
        ) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))


@contextlib.contextmanager
def _staging(output: Path) -> Iterator[Path]:
    """A sibling folder that becomes ``output`` only if the body finishes without error."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(
            f"{output} exists, is not empty and does not verify; "
            "remove it to prepare the dataset again"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            output.rmdir()  # an empty folder (e.g. made by a workflow engine) is replaced
        os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _archive_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(base name, bytes) of every regular file in a zip/tar archive, macOS forks dropped."""

    def wanted(member_name: str) -> bool:
        parts = Path(member_name).parts
        return bool(parts) and not parts[-1].startswith("._") and "__MACOSX" not in parts

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and wanted(info.filename):
                    yield Path(info.filename).name, zf.read(info)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and wanted(member.name):
                    handle = tf.extractfile(member)
                    yield Path(member.name).name, handle.read() if handle else b""
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")


# --------------------------------------------------------------------------------------------
# Kodak
# --------------------------------------------------------------------------------------------


def _kodak_names(only: Iterable[str] | None) -> list[str]:
    if only is None:
        return sorted(KODAK_SHA256)
    names = sorted({n if n.endswith(".png") else f"{n}.png" for n in only})
    unknown = [n for n in names if n not in KODAK_SHA256]
    if unknown:
        raise ValueError(f"not Kodak image names: {unknown} (expected kodim01.png..kodim24.png)")
    return names


def verify_kodak(
    folder: str | Path, only: Iterable[str] | None = None, origin: str | None = None
) -> list[Path]:
    """Check the pinned hash of every (selected) Kodak file in ``folder``; return their paths."""
    folder = Path(folder)
    paths = []
    for name in _kodak_names(only):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"Kodak image missing: {path}")
        actual = sha256_file(path)
        if actual != KODAK_SHA256[name]:
            raise ChecksumError(name, KODAK_SHA256[name], actual, origin or str(path))
        paths.append(path)
    return paths


def prepare_kodak(
    source: str | Path | None, output: str | Path, only: Iterable[str] | None = None
) -> list[Path]:
    """Gather Kodak from a folder, archive or base URL into ``output``, verifying every file."""
    output = Path(output)
    names = _kodak_names(only)
    with contextlib.suppress(FileNotFoundError, ChecksumError):
        if output.is_dir():
            return verify_kodak(output, names)  # already prepared
    source = KODAK_URL if source is None else str(source)
    with _staging(output) as staging:
        if _is_url(source):
            base = source if source.endswith("/") else source + "/"
            for name in tqdm(names, desc="Kodak", unit="img"):
                _download(urllib.parse.urljoin(base, name), staging / name)
        elif Path(source).is_dir():
            found = {p.name: p for p in sorted(Path(source).rglob("kodim*.png"))}
            for name in names:
                if name not in found:
                    raise FileNotFoundError(f"{name} not found under {source}")
                shutil.copyfile(found[name], staging / name)
        elif Path(source).is_file():
            wanted = set(names)
            for name, data in _archive_members(Path(source)):
                if name in wanted:
                    (staging / name).write_bytes(data)
        else:
            raise FileNotFoundError(f"Kodak source not found: {source}")
        missing = [name for name in names if not (staging / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{source} lacks Kodak image(s) {missing}")
        verify_kodak(staging, names, origin=source)
    return [output / name for name in names]


# --------------------------------------------------------------------------------------------
# CLIC 2020 professional validation
# --------------------------------------------------------------------------------------------


def verify_manifest(folder: str | Path) -> list[Path]:
    """Check every file listed in ``folder/SHA256SUMS``; return the image paths."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}; prepare the dataset first")
    paths = []
    for line in manifest.read_text().splitlines():
        expected, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"listed in {manifest} but missing: {path}")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(name, expected, actual, str(path))
        paths.append(path)
    return paths


def _locate_clic_zip(source: str | None, scratch: Path) -> Path:
    if source is None or _is_url(source):
        urls = CLIC_PRO_VALID_URLS if source is None else (source,)
        errors = []
        for url in urls:
            target = scratch / Path(urllib.parse.urlparse(url).path).name
            try:
                _download(url, target)
                return target
            except OSError as err:  # try the next mirror
                errors.append(f"{url}: {err}")
        raise OSError(
            "could not download CLIC 2020 professional validation:\n  " + "\n  ".join(errors)
        )
    path = Path(source)
    if path.is_dir():
        for name in CLIC_PRO_VALID_ZIP_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"no {' or '.join(CLIC_PRO_VALID_ZIP_NAMES)} in {path}; the "
            "archive is needed to verify the checksum"
        )
    if not path.is_file():
        raise FileNotFoundError(f"CLIC source not found: {path}")
    return path


def prepare_clic(
    source: str | Path | None,
    output: str | Path,
    expected_sha256: str = CLIC_PRO_VALID_SHA256,
    expected_images: int | None = CLIC_PRO_VALID_IMAGES,
) -> list[Path]:
    """Verify the CLIC validation zip, then extract its images flat into ``output``."""
    output = Path(output)
    with contextlib.suppress(FileNotFoundError, ChecksumError):
        if output.is_dir():
            return verify_manifest(output)  # already prepared
    with _staging(output) as staging:
        archive = _locate_clic_zip(None if source is None else str(source), staging)
        actual = sha256_file(archive)
        if actual != expected_sha256:
            raise ChecksumError(archive.name, expected_sha256, actual, str(source or "mirror"))
        images = [
            (n, d) for n, d in _archive_members(archive) if Path(n).suffix.lower() in IMAGE_SUFFIXES
        ]
        if archive.parent == staging:
            archive.unlink()  # a downloaded archive is not part of the dataset folder
        if expected_images is not None and len(images) != expected_images:
            raise ValueError(f"{archive.name}: {len(images)} images, expected {expected_images}")
        # Hashed from the bytes written (already covered by the archive's hash): no second read.
        digests = {}
        for name, data in tqdm(images, desc="CLIC", unit="img"):
            (staging / name).write_bytes(data)
            digests[name] = hashlib.sha256(data).hexdigest()
        names = sorted(digests)
        (staging / MANIFEST).write_text("".join(f"{digests[name]}  {name}\n" for name in names))
    return [output / name for name in names]


# --------------------------------------------------------------------------------------------
# Tecnick (TESTIMAGES RGB_OR_1200x1200)
# --------------------------------------------------------------------------------------------

TECNICK_URL = "https://sourceforge.net/projects/testimages/files/OLD/OLD_SAMPLING/testimages.zip"
TECNICK_NAME = re.compile(r"^RGB_OR_1200x1200_(\d{3})\.png$")
TECNICK_IMAGES = 100
TECNICK_SIZE = (1200, 1200)
TECNICK_PINNED = Path(__file__).with_name("tecnick.sha256")  # absent until someone pins a copy


def read_manifest(path: str | Path) -> dict[str, str]:
    """name -> SHA-256 of a ``sha256sum``-format file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            raise ValueError(f"{path}:{number}: expected '<sha256>  <name>', got {line!r}")
        entries[parts[1].strip()] = parts[0]
    return entries


def _tecnick_pinned(manifest: str | Path | None) -> dict[str, str] | None:
    if manifest is not None:
        return read_manifest(manifest)
    return read_manifest(TECNICK_PINNED) if TECNICK_PINNED.is_file() else None


def _tecnick_members(source: Path) -> Iterator[tuple[str, bytes]]:
    if source.is_dir():
        for path in sorted(source.rglob("RGB_OR_1200x1200_*.png")):
            yield path.name, path.read_bytes()
    elif source.is_file():
        yield from ((n, d) for n, d in _archive_members(source) if TECNICK_NAME.match(n))
    else:
        raise FileNotFoundError(f"Tecnick source not found: {source}")


def _check_tecnick_image(name: str, data: bytes, origin: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            size, mode = image.size, image.mode
    except OSError as err:
        raise ValueError(f"{name} (from {origin}) is not a readable PNG: {err}") from None
    if size != TECNICK_SIZE or mode != "RGB":
        raise ValueError(
            f"{name} (from {origin}) is {size[0]}x{size[1]} {mode}; Tecnick images are "
            f"{TECNICK_SIZE[0]}x{TECNICK_SIZE[1]} RGB (folder RGB/RGB_OR_1200x1200)"
        )


def verify_tecnick(folder: str | Path, manifest: str | Path | None = None) -> list[Path]:
    """Check ``folder/SHA256SUMS`` and, when a manifest is pinned, that it lists the same hashes."""
    paths = verify_manifest(folder)
    pinned = _tecnick_pinned(manifest)
    if pinned is not None:
        written = read_manifest(Path(folder) / MANIFEST)
        for name, expected in sorted(pinned.items()):
            if written.get(name) != expected:
                raise ChecksumError(name, expected, written.get(name, "(missing)"), str(folder))
    return paths


def prepare_tecnick(
    source: str | Path | None, output: str | Path, manifest: str | Path | None = None
) -> list[Path]:
    """Gather the 100 Tecnick images from the TESTIMAGES zip or a folder, check, hash, place
    them."""
    output = Path(output)
    with contextlib.suppress(FileNotFoundError, ChecksumError):
        if output.is_dir():
            return verify_tecnick(output, manifest)  # already prepared
    if source is None or _is_url(str(source)):
        raise ValueError(
            f"Tecnick is prepared from a local copy only: download {TECNICK_URL}, then pass "
            "--source with the zip or the folder it extracts to"
        )
    source = Path(source)
    pinned = _tecnick_pinned(manifest)
    with _staging(output) as staging:
        digests: dict[str, str] = {}
        for name, data in tqdm(_tecnick_members(source), desc="Tecnick", unit="img"):
            if name in digests:
                raise ValueError(f"{source} holds {name} twice; point --source at one copy")
            _check_tecnick_image(name, data, str(source))
            digest = hashlib.sha256(data).hexdigest()
            if pinned is not None and pinned.get(name) != digest:
                raise ChecksumError(
                    name, pinned.get(name, "(not in the pinned manifest)"), digest, str(source)
                )
            (staging / name).write_bytes(data)
            digests[name] = digest
        expected = {f"RGB_OR_1200x1200_{k:03d}.png" for k in range(1, TECNICK_IMAGES + 1)}
        if set(digests) != expected:
            missing, extra = sorted(expected - set(digests)), sorted(set(digests) - expected)
            raise ValueError(
                f"{source}: {len(digests)} Tecnick images, expected RGB_OR_1200x1200_001.png .. "
                "_100.png"
                + (
                    f"; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                    if missing
                    else ""
                )
                + (f"; unexpected {extra[:5]}" if extra else "")
            )
        names = sorted(digests)
        (staging / MANIFEST).write_text("".join(f"{digests[name]}  {name}\n" for name in names))
    if pinned is None:
        archive = f" (archive SHA-256 {sha256_file(source)})" if source.is_file() else ""
        print(
            f"warning: no pinned Tecnick manifest ({TECNICK_PINNED} or --manifest): the hashes "
            f"were taken from this copy{archive} and written to {output / MANIFEST}. Pin them by "
            f"copying that file to {TECNICK_PINNED}; every later copy is then verified against it.",
            file=sys.stderr,
        )
    return [output / name for name in names]


# --------------------------------------------------------------------------------------------
# The registry of prepared dataset kinds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetKind:
    """A dataset kind that a rule prepares (a study config's ``datasets.<name>.kind``).

    ``prepare(source, output, **options)`` gathers, verifies and places the images (``source``:
    a folder, archive or URL; None: the pinned download, where there is one) and
    ``verify(folder, **options)`` re-checks a prepared folder; both return the image paths.
    ``options``: the keyword options both accept (``only``: a subset of file names; ``manifest``:
    a SHA256SUMS to check against), offered as ``--only`` / ``--manifest`` by ``hpcm data``.
    """

    name: str
    prepare: Callable[..., list[Path]]
    verify: Callable[..., list[Path]]
    options: tuple[str, ...] = ()


DATASET_KINDS: dict[str, DatasetKind] = {}
DATASET_OPTIONS = ("only", "manifest")  # every option a kind may declare (the CLI offers each)


def register_dataset(kind: DatasetKind) -> DatasetKind:
    """Add ``kind`` to :data:`DATASET_KINDS` (a name may be registered once)."""
    if kind.name in DATASET_KINDS:
        raise ValueError(f"dataset kind {kind.name!r} is registered twice")
    unknown = sorted(set(kind.options) - set(DATASET_OPTIONS))
    if unknown:
        raise ValueError(
            f"dataset kind {kind.name!r}: unknown options {unknown} "
            f"(known: {', '.join(DATASET_OPTIONS)})"
        )
    DATASET_KINDS[kind.name] = kind
    return kind


def dataset_options() -> dict[str, tuple[str, ...]]:
    """Kind -> its options: what the study config (an earlier stage) is told of the registry."""
    return {name: kind.options for name, kind in DATASET_KINDS.items()}


register_dataset(DatasetKind("kodak", prepare_kodak, verify_kodak, options=("only",)))
register_dataset(DatasetKind("clic2020-professional", prepare_clic, verify_manifest))
register_dataset(DatasetKind("tecnick", prepare_tecnick, verify_tecnick, options=("manifest",)))
