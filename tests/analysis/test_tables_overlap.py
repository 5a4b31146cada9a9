"""The BD table's overlap is the smaller of the two BD integrals' overlaps, and says which range
it is of (issue 26 point 3): curves that overlap little in rate but fully in quality, and the
reverse. The expected overlaps are closed forms: intersection over union of the two ranges."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hpcm.analysis import tables
from tests.analysis.test_tables import ANALYSIS, synthetic  # noqa: F401, F811 (a fixture)

REFERENCE = ([0.1, 0.2, 0.4, 0.8], [30.0, 32.0, 34.0, 36.0])
CURVES = {
    # the same PSNRs at a quarter of the rate: log-rate ranges [0.025, 0.2] and [0.1, 0.8]
    "rate_shifted": ([0.025, 0.05, 0.1, 0.2], [30.0, 32.0, 34.0, 36.0]),
    # the same rates 4 dB higher: PSNR ranges [34, 40] and [30, 36]
    "quality_shifted": ([0.1, 0.2, 0.4, 0.8], [34.0, 36.0, 38.0, 40.0]),
}
RATE_OVERLAP = math.log(0.2 / 0.1) / math.log(0.8 / 0.025)  # 1 of 5 octaves
QUALITY_OVERLAP = (36.0 - 34.0) / (40.0 - 30.0)


def points() -> pd.DataFrame:
    rows = []
    for variant, (bpp, psnr) in {"baseline": REFERENCE, **CURVES}.items():
        rows += [
            {"dataset": "kodak", "variant": variant, "bpp": b, "psnr": p} for b, p in zip(bpp, psnr)
        ]
    return pd.DataFrame(rows)


def test_the_table_shows_the_smaller_overlap_and_its_range():
    table = tables.bd_vs(points(), "baseline", "pchip", "psnr")
    rows = {r["variant"]: r for r in table.frame.to_dict("records")}
    assert rows["rate_shifted"]["overlap (%)"] == pytest.approx(RATE_OVERLAP * 100)
    assert rows["rate_shifted"]["overlap of"] == "rate"
    assert rows["quality_shifted"]["overlap (%)"] == pytest.approx(QUALITY_OVERLAP * 100)
    assert rows["quality_shifted"]["overlap of"] == "distortion"
    notes = " ".join(table.notes)
    assert "kodak/rate_shifted: low overlap (20 % of the rate range)" in notes
    assert "kodak/quality_shifted: low overlap (20 % of the distortion range)" in notes
    markdown = tables.to_markdown(table)
    assert "100 %" not in markdown and "| 100 |" not in markdown


def test_every_table_says_when_the_test_photos_were_not_held_out(synthetic, tmp_path):  # noqa: F811 (the imported fixture)
    """allow_test_data_in_training (hpcm.config.study): the analysis YAML lists the overlaps and
    every table of hpcm tables repeats them in its notes (issue 26 point 2)."""
    sentence = (
        "val_data (results/data/samples/test) holds the images of the evaluated dataset "
        "datasets.samples (results/data/samples/test)"
    )
    root = synthetic["root"]
    analysis = {**ANALYSIS, tables.NOT_HELD_OUT: [sentence]}
    written = tables.build_all(
        root / "points.csv", root / "train", analysis, tmp_path, benchmarks=root / "bench"
    )
    markdown = [p for p in written if p.suffix == ".md"]
    assert len(markdown) >= 4
    for path in markdown:
        note = f"NOT HELD OUT (allow_test_data_in_training: true): {sentence}"
        assert note in path.read_text(), path
    # a study that held them out says nothing of the kind
    assert not any("NOT HELD OUT" in p.read_text() for p in synthetic["out"].glob("*.md"))
