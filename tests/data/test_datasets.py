"""Dataset preparation: checksums, tampering, archives, atomic placement (no network)."""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import pytest

from hpcm.data import commands, datasets
from tests.paths import KODAK, REPO

SUBSET = ["kodim01.png", "kodim02.png", "kodim03.png"]
# Only this check needs Kodak's exact bytes; the others run the same code on stand-in files.
needs_kodak = pytest.mark.skipif(
    not (KODAK / "kodim01.png").is_file(),
    reason=f"needs the shared Kodak copy's exact bytes (not at {KODAK})",
)


@pytest.fixture()
def kodak_copy(tmp_path, monkeypatch):
    """Stand-ins for kodim01-03: crops of photos that ship with scikit-image, under Kodak's names,
    with their hashes put into the pinned table, so that preparation, tampering, archives and the
    CLI are tested on a clone without ../shared (the pinned Kodak hashes:
    test_pinned_hashes_...)."""
    from PIL import Image
    from skimage import data

    folder = tmp_path / "src"
    folder.mkdir()
    for name, image in zip(SUBSET, (data.astronaut(), data.coffee(), data.chelsea())):
        Image.fromarray(image[:64, :96]).save(folder / name)
        monkeypatch.setitem(
            datasets.KODAK_SHA256, name, hashlib.sha256((folder / name).read_bytes()).hexdigest()
        )
    return folder


@needs_kodak
def test_pinned_hashes_match_shared_copy_independently():
    # hashlib directly, not our helper; plus the whole-corpus digest of orchestration.md §5.1
    listing = "".join(
        f"{hashlib.sha256((KODAK / n).read_bytes()).hexdigest()}  {n}\n"
        for n in sorted(datasets.KODAK_SHA256)
    )
    assert hashlib.sha256(listing.encode()).hexdigest() == (
        "3eaa5bd52eb8c894d351cf607028f5d3d80e778fd0267eeff8c73d66539a25d5"
    )
    assert len(datasets.KODAK_SHA256) == 24


def test_prepare_from_folder_and_rerun_is_noop(kodak_copy, tmp_path):
    out = tmp_path / "kodak"
    paths = datasets.prepare_kodak(kodak_copy, out, only=SUBSET)
    assert [p.name for p in paths] == SUBSET
    assert sorted(p.name for p in out.iterdir()) == SUBSET
    mtime = (out / SUBSET[0]).stat().st_mtime_ns
    datasets.prepare_kodak(kodak_copy, out, only=SUBSET)
    assert (out / SUBSET[0]).stat().st_mtime_ns == mtime


def test_tampered_file_is_named_with_both_hashes_and_nothing_is_written(kodak_copy, tmp_path):
    victim = kodak_copy / "kodim02.png"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    out = tmp_path / "kodak"
    with pytest.raises(datasets.ChecksumError) as err:
        datasets.prepare_kodak(kodak_copy, out, only=SUBSET)
    message = str(err.value)
    assert "kodim02.png" in message
    assert datasets.KODAK_SHA256["kodim02.png"] in message and actual in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging leftovers


def test_prepare_from_url_and_archive(kodak_copy, tmp_path):
    # file:// exercises the download path without a network.
    out = tmp_path / "via_url"
    datasets.prepare_kodak(kodak_copy.as_uri() + "/", out, only=SUBSET[:2])
    assert sorted(p.name for p in out.iterdir()) == SUBSET[:2]
    archive = tmp_path / "kodak.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in SUBSET:
            tf.add(kodak_copy / name, arcname=f"kodak/{name}")
    out2 = tmp_path / "via_tar"
    datasets.prepare_kodak(archive, out2, only=SUBSET)
    datasets.verify_kodak(out2, SUBSET)
    with pytest.raises(FileNotFoundError, match="kodim04.png"):
        datasets.prepare_kodak(archive, tmp_path / "x", only=["kodim04"])
    assert not (tmp_path / "x").exists()


def test_unknown_kodak_name():
    with pytest.raises(ValueError, match="kodim99.png"):
        datasets.prepare_kodak("/nonexistent", "/tmp/never", only=["kodim99"])


def _fake_clic_zip(path: Path, n_images: int = 3) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n_images):
            zf.writestr(f"valid/img{i}.png", f"png-bytes-{i}".encode())
            zf.writestr(f"valid/._img{i}.png", b"resource fork")
        zf.writestr("__MACOSX/valid/._img0.png", b"resource fork")
        zf.writestr("valid/", b"")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_clic_zip_verified_forks_dropped_and_manifest_written(tmp_path, monkeypatch):
    archive = tmp_path / "clic2020_professional_valid.zip"
    digest = _fake_clic_zip(archive)
    out = tmp_path / "clic"
    hashed = []
    real_sha256_file = datasets.sha256_file
    monkeypatch.setattr(
        datasets, "sha256_file", lambda path: hashed.append(Path(path)) or real_sha256_file(path)
    )
    paths = datasets.prepare_clic(archive, out, expected_sha256=digest, expected_images=3)
    assert hashed == [archive]  # the images are hashed from the bytes written, not read back
    assert sorted(p.name for p in paths) == ["img0.png", "img1.png", "img2.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS",
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    assert (out / "SHA256SUMS").read_text() == "".join(
        f"{hashlib.sha256(f'png-bytes-{i}'.encode()).hexdigest()}  img{i}.png\n" for i in range(3)
    )
    assert datasets.verify_manifest(out) == paths
    (out / "img1.png").write_bytes(b"changed")
    with pytest.raises(datasets.ChecksumError, match="img1.png"):
        datasets.verify_manifest(out)


def test_clic_checksum_mismatch_names_archive_and_hashes(tmp_path):
    archive = tmp_path / "src" / "clic2020_professional_valid.zip"
    archive.parent.mkdir()
    digest = _fake_clic_zip(archive)
    out = tmp_path / "clic"
    with pytest.raises(datasets.ChecksumError) as err:
        datasets.prepare_clic(archive.parent, out)  # a folder holding the zip; pinned hash
    assert "clic2020_professional_valid.zip" in str(err.value)
    assert datasets.CLIC_PRO_VALID_SHA256 in str(err.value) and digest in str(err.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_prepare_and_verify(kodak_copy, tmp_path, capsys):
    out = tmp_path / "k"
    assert (
        commands.main(
            [
                "prepare",
                "kodak",
                "--source",
                str(kodak_copy),
                "--output",
                str(out),
                "--only",
                "kodim01.png,kodim03",
            ]
        )
        == 0
    )
    assert commands.main(["verify", "kodak", str(out)]) == 2  # only 2 of 24 present
    assert "kodim02.png" in capsys.readouterr().err
    assert commands.main(["verify", "kodak", str(out), "--only", "kodim01.png,kodim03.png"]) == 0


def test_cli_refuses_an_option_the_kind_does_not_take(kodak_copy, tmp_path, capsys):
    out = tmp_path / "c"
    assert (
        commands.main(["prepare", "clic2020-professional", "--output", str(out), "--only", "a.png"])
        == 2
    )
    assert "--only applies to kodak, not clic2020-professional" in capsys.readouterr().err
    assert commands.main(["verify", "kodak", str(kodak_copy), "--manifest", "m"]) == 2
    assert "--manifest applies to tecnick, not kodak" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------ the registry

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def test_the_schema_kind_enum_is_the_registry_plus_the_local_kinds():
    import yaml

    from hpcm.config.study import LOCAL_DATASET_KINDS

    schema = yaml.safe_load(SCHEMA.read_text())
    kind = schema["properties"]["datasets"]["additionalProperties"]["properties"]["kind"]
    assert sorted(kind["enum"]) == sorted([*LOCAL_DATASET_KINDS, *datasets.DATASET_KINDS])


def test_every_kind_prepares_and_verifies_with_the_options_it_declares():
    import inspect

    for kind in datasets.DATASET_KINDS.values():
        for function in (kind.prepare, kind.verify):
            parameters = inspect.signature(function).parameters
            assert set(kind.options) <= set(parameters), (kind.name, function)
    assert set(datasets.DATASET_OPTIONS) == set(commands.OPTION_HELP)


def test_a_kind_registers_once_with_known_options(monkeypatch):
    monkeypatch.setattr(datasets, "DATASET_KINDS", dict(datasets.DATASET_KINDS))
    kodak = datasets.DATASET_KINDS["kodak"]
    with pytest.raises(ValueError, match="'kodak' is registered twice"):
        datasets.register_dataset(kodak)
    with pytest.raises(ValueError, match=r"unknown options \['subset'\]"):
        datasets.register_dataset(
            datasets.DatasetKind("mine", kodak.prepare, kodak.verify, ("subset",))
        )


# ------------------------------------------------------------------------------------------ Tecnick

TECNICK_NAMES = [f"RGB_OR_1200x1200_{k:03d}.png" for k in range(1, 101)]


def _png(size=(1200, 1200), mode="RGB", marker=0) -> bytes:
    from io import BytesIO

    from PIL import Image

    image = Image.new(mode, size, (marker % 256, marker // 256, 7) if mode == "RGB" else 0)
    buffer = BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tecnick_files():
    return {name: _png(marker=k) for k, name in enumerate(TECNICK_NAMES)}


def _tecnick_folder(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / "testimages" / "RGB" / "RGB_OR_1200x1200"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (root / "testimages" / "RGB" / "RGB_R02_0600x0600_001.png").write_bytes(
        _png((600, 600))
    )  # other size: ignored
    return root / "testimages"


def test_tecnick_first_copy_writes_the_manifest_and_says_so(
    tmp_path, tecnick_files, capsys, monkeypatch
):
    monkeypatch.setattr(datasets, "TECNICK_PINNED", tmp_path / "absent.sha256")
    out = tmp_path / "tecnick"
    paths = datasets.prepare_tecnick(_tecnick_folder(tmp_path, tecnick_files), out)
    assert [p.name for p in paths] == TECNICK_NAMES
    listing = "".join(
        f"{hashlib.sha256(tecnick_files[n]).hexdigest()}  {n}\n" for n in TECNICK_NAMES
    )
    assert (out / datasets.MANIFEST).read_text() == listing  # hashlib directly, sha256sum format
    assert "no pinned Tecnick manifest" in capsys.readouterr().err
    mtime = (out / TECNICK_NAMES[0]).stat().st_mtime_ns
    datasets.prepare_tecnick(
        tmp_path / "elsewhere", out
    )  # prepared and verified: no-op, source unused
    assert (out / TECNICK_NAMES[0]).stat().st_mtime_ns == mtime


def test_tecnick_pinned_manifest_catches_a_changed_image_in_an_archive(
    tmp_path, tecnick_files, monkeypatch
):
    pinned = tmp_path / "tecnick.sha256"
    pinned.write_text(
        "".join(f"{hashlib.sha256(tecnick_files[n]).hexdigest()}  {n}\n" for n in TECNICK_NAMES)
    )
    monkeypatch.setattr(datasets, "TECNICK_PINNED", pinned)
    archive = tmp_path / "testimages.zip"
    changed = dict(tecnick_files, **{TECNICK_NAMES[41]: _png(marker=999)})
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in changed.items():
            zf.writestr(f"testimages/RGB/RGB_OR_1200x1200/{name}", data)
        zf.writestr("__MACOSX/testimages/RGB/RGB_OR_1200x1200/._" + TECNICK_NAMES[0], b"fork")
    out = tmp_path / "tecnick"
    with pytest.raises(datasets.ChecksumError, match=TECNICK_NAMES[41]):
        datasets.prepare_tecnick(archive, out)
    assert not out.exists()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in tecnick_files.items():
            zf.writestr(f"testimages/RGB/RGB_OR_1200x1200/{name}", data)
    assert len(datasets.prepare_tecnick(archive, out)) == 100
    assert commands.main(["verify", "tecnick", str(out)]) == 0


def test_tecnick_wrong_count_size_or_source_fails_clearly(tmp_path, tecnick_files):
    few = dict(list(tecnick_files.items())[:99])
    with pytest.raises(
        ValueError, match=r"99 Tecnick images.*missing \['RGB_OR_1200x1200_100.png'\]"
    ):
        datasets.prepare_tecnick(_tecnick_folder(tmp_path / "a", few), tmp_path / "out_a")
    small = dict(tecnick_files, **{TECNICK_NAMES[0]: _png((1200, 1199))})
    with pytest.raises(ValueError, match="1200x1199 RGB"):
        datasets.prepare_tecnick(_tecnick_folder(tmp_path / "b", small), tmp_path / "out_b")
    with pytest.raises(ValueError, match="local copy only.*sourceforge"):
        datasets.prepare_tecnick(None, tmp_path / "out_c")
    bad = tmp_path / "bad.sha256"
    bad.write_text("xyz  RGB_OR_1200x1200_001.png\n")
    with pytest.raises(ValueError, match="bad.sha256:1"):
        datasets.read_manifest(bad)
