"""The test photos never train or select a model (issue 26 point 2): the study check refuses a
train_data / val_data that is, holds or lies inside an evaluated dataset, naming both keys, unless
allow_test_data_in_training says it is meant; then every table says so."""

from __future__ import annotations

import pytest

from hpcm.config import study
from tests.config.test_study import load, small


@pytest.mark.parametrize("key", ["train_data", "val_data"])
def test_the_samples_test_split_as_training_or_validation_data_is_refused(key):
    with pytest.raises(study.StudyConfigError) as info:
        load(small(**{key: "results/data/samples/test"}))
    message = str(info.value)
    assert f"'{key}'" in message and "datasets.samples" in message
    assert "allow_test_data_in_training: true" in message


def test_an_evaluated_folder_dataset_or_its_parent_is_refused(tmp_path):
    photos = tmp_path / "photos"
    (photos / "test").mkdir(parents=True)
    datasets = {"mine": {"kind": "folder", "source": str(photos / "test")}}
    for val_data in (str(photos / "test"), str(photos), str(photos / "test") + "/"):
        with pytest.raises(study.StudyConfigError, match=r"'val_data'.*datasets\.mine"):
            load(small(val_data=val_data, datasets=datasets))
    # a sibling folder is held out
    (photos / "val").mkdir()
    assert load(small(val_data=str(photos / "val"), datasets=datasets)).runs()


def test_a_prepared_dataset_folder_is_refused():
    datasets = {"kodak": {"kind": "kodak"}}
    with pytest.raises(study.StudyConfigError, match=r"'train_data'.*datasets\.kodak"):
        load(small(train_data="results/data/kodak", datasets=datasets))


def test_the_opt_out_passes_and_names_every_overlap():
    s = load(small(val_data="results/data/samples/test", allow_test_data_in_training=True))
    assert s.test_data_in_training() == [
        "val_data (results/data/samples/test) holds the images of the evaluated dataset "
        "datasets.samples (results/data/samples/test)"
    ]
    assert load(small()).test_data_in_training() == []
