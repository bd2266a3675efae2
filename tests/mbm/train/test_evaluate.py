from mbm.data.errors import skip_reasons
from mbm.train.evaluate import empty_split


def test_an_empty_split_is_named_and_the_advice_fits_it():
    assert empty_split("classify", {}).startswith("the held-out split is empty")
    assert "--val-fraction" in empty_split("classify", {})
    train = empty_split("classify", {}, "train")
    assert train.startswith("the train split is empty") and "--val-fraction" not in train
    skipped = empty_split("classify", {"task.no_label": 3}, "train")
    assert skipped == ("the train split has no sample the classify task can use: "
                       "skipped 3 samples without a label (classify needs one) (task.no_label)")


def test_samples_without_a_modality_the_model_reads_are_named_with_those_modalities():
    counts = {"task.no_used_modality": 65, "task.no_text": 2}
    assert skip_reasons(counts) == ("65 samples with none of the modalities this model reads (task.no_used_modality); "
                                    "2 samples without text (generate predicts the text) (task.no_text)")
    assert skip_reasons({"task.no_used_modality": 4}, ["image"], "classify") == (
        "4 samples with none of the modalities this model reads (image) (task.no_used_modality)")
    text_only = empty_split("generate", {"task.no_used_modality": 65}, "val", ["image", "audio"])
    assert text_only == ("the held-out split has no sample the generate task can use: skipped 65 samples with none "
                         "of the modalities this model reads (image, audio): generate predicts a sample's text from "
                         "these, so it needs samples that have them (task.no_used_modality)")
    assert skip_reasons({"npy.bad": 1, "task.no_label": 2}) == (  # a data reason's code says what it is
        "1 npy.bad; 2 samples without a label (classify needs one) (task.no_label)")
