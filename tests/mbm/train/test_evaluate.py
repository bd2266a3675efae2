from mbm.train.evaluate import empty_split


def test_an_empty_split_is_named_and_the_advice_fits_it():
    assert empty_split("classify", {}).startswith("the held-out split is empty")
    assert "--val-fraction" in empty_split("classify", {})
    train = empty_split("classify", {}, "train")
    assert train.startswith("the train split is empty") and "--val-fraction" not in train
    skipped = empty_split("classify", {"task.no_label": 3}, "train")
    assert skipped == ("the train split has no sample the classify task can use: "
                       "skipped 3 samples without a label (classify needs one) (task.no_label)")
