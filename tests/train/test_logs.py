"""wandb keys: every metric key the seed trainers log exists under the seed's name; metrics.csv
keeps its columns."""

from __future__ import annotations

import csv

import pytest

from hpcm.train import logs
from hpcm.train import loop as train
from tests.train.tiny import cli_args

# The seed trainers' wandb.log keys, copied from yutendo0714/LIC-HPCM-Balanced (commit ffc0ab5),
# with the metrics.csv column that holds the same quantity here (the seed's value named after the
# arrow):
PHASE1_SEED_KEYS = {  # phase1/train.py: train_one_epoch (per step) and test_epoch (per validation)
    "epoch": "epoch",
    "train/loss": "loss",
    "train/distortion": "distortion",
    "train/bpp_loss": "bpp",
    "train/mse_loss": "mse",  # out_criterion["mse_loss"]: MSE of x_hat against x in [0, 1]
    "train/psnr": "psnr",
    "train/y_bpp": "y_bpp",
    "train/z_bpp": "z_bpp",
    "train/lr": "lr",
    # softmax(optimizer.w)[0], Balanced runs
    "train/task_weight_distortion": "task_weight_distortion",
    "train/task_weight_bpp": "task_weight_bpp",
    "test/loss": "val_loss",
    "test/distortion": "val_distortion",
    "test/mse_loss": "val_mse",
    "test/bpp_loss": "val_bpp",
    "test/psnr": "val_psnr",
    "test/y_bpp": "val_y_bpp",
    "test/z_bpp": "val_z_bpp",
}
PHASE2_SEED_KEYS = {
    **PHASE1_SEED_KEYS,
    "train/gamma": "gamma",
}  # phase2/train.py adds optimizer.gamma
# phase3/train.py: train_one_epoch, test_epoch and the gamma_manager's wandb.log
PHASE3_SEED_KEYS = {
    "epoch": "epoch",
    "train/loss": "loss",
    "train/psnr": "psnr",
    "train/s1_distortion": "s1_distortion",
    "train/s1_bpp": "s1_bpp",
    "train/s2_distortion": "s2_distortion",
    "train/s2_bpp": "s2_bpp",
    "train/s3_bpp": "s3_bpp",
    # f'weights/{k}' over optimizer.get_task_weights(): keys s1_distortion ... s3_bpp
    "weights/s1_distortion": "task_weight_s1_distortion",
    "weights/s1_bpp": "task_weight_s1_bpp",
    "weights/s2_distortion": "task_weight_s2_distortion",
    "weights/s2_bpp": "task_weight_s2_bpp",
    "weights/s3_bpp": "task_weight_s3_bpp",
    # f'scale_contrib/{k}' over get_scale_contributions() (also /work/shared/seeds/000_*.txt),
    # f'gamma/{k}'
    "scale_contrib/s1": "scale_contribution_s1",
    "scale_contrib/s2": "scale_contribution_s2",
    "scale_contrib/s3": "scale_contribution_s3",
    "gamma/s1": "gamma_s1",
    "gamma/s2": "gamma_s2",
    "gamma/s3": "gamma_s3",
    "test/loss": "val_loss",
    "test/psnr": "val_psnr",
    "test/bpp": "val_bpp",
}
# metrics.csv before the wandb keys were completed (commit f7dde30): these columns stay, named as
# they were.
CSV_COLUMNS_BEFORE = (
    "step",
    "epoch",
    "lr",
    "loss",
    "loss_std",
    "loss_steps",
    "distortion",
    "bpp",
    "y_bpp",
    "z_bpp",
    "mse",
    "psnr",
    "val_loss",
    "val_distortion",
    "val_bpp",
    "val_psnr",
    "task_weight_distortion",
    "task_weight_bpp",
    "task_weight_s1_distortion",
    "task_weight_s1_bpp",
    "task_weight_s2_distortion",
    "task_weight_s2_bpp",
    "task_weight_s3_bpp",
    "gamma",
    "gamma_s1",
    "gamma_s2",
    "gamma_s3",
    "s1_distortion",
    "s1_bpp",
    "s2_distortion",
    "s2_bpp",
    "s3_bpp",
    "scale_contribution_s1",
    "scale_contribution_s2",
    "scale_contribution_s3",
    "skipped_steps",
    "step_time",
)


def test_every_seed_key_maps_to_the_column_of_the_same_quantity():
    row = {column: float(i) for i, column in enumerate(logs.METRIC_COLUMNS)}  # every cell distinct
    payload = logs.wandb_payload(row)
    for key, column in {**PHASE2_SEED_KEYS, **PHASE3_SEED_KEYS}.items():
        assert key in payload, f"seed wandb key {key!r} is not logged"
        assert payload[key] == row[column], (
            f"{key!r} logs column {logs.WANDB_KEYS[key]!r}, not {column!r}"
        )


def test_metrics_csv_keeps_its_columns_and_empty_cells_are_not_logged():
    assert [c for c in logs.METRIC_COLUMNS if c in CSV_COLUMNS_BEFORE] == list(CSV_COLUMNS_BEFORE)
    assert set(logs.WANDB_KEYS.values()) <= set(logs.METRIC_COLUMNS)
    assert logs.wandb_payload({"step": 3, "loss": 2.0, "val_loss": None}) == {"train/loss": 2.0}


def test_a_table_with_the_earlier_header_keeps_its_rows_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS_BEFORE, lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0}]
        )
    table = logs.MetricsCSV(path, resume_step=2)
    table.write({"step": 3, "loss": 0.5, "val_y_bpp": 0.1})
    table.close()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["loss"], r["val_y_bpp"]) for r in rows] == [
        ("1", "3.0", ""),
        ("2", "2.0", ""),
        ("3", "0.5", "0.1"),
    ]


@pytest.mark.parametrize(
    "variant, seed_keys", [("phase2", PHASE2_SEED_KEYS), ("phase3", PHASE3_SEED_KEYS)]
)
def test_a_validated_row_of_a_run_logs_every_seed_key(tmp_path, variant, seed_keys):
    out = tmp_path / variant
    assert train.main(cli_args(out, variant=variant, steps=2, val_every=2)) == train.EXIT_OK
    with open(out / "metrics.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    payload = logs.wandb_payload({k: float(v) for k, v in last.items() if v != ""})
    assert sorted(set(seed_keys) - set(payload)) == []
