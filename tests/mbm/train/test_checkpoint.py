import os
import random

import numpy as np
import pytest
import torch

from mbm.train.checkpoint import (
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    point_best,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_save_is_atomic_points_latest_and_prunes(tmp_path):
    folder = str(tmp_path / "ck")
    for step in (10, 20, 30, 40):
        save_checkpoint(folder, step, {"step": step, "w": torch.ones(2) * step}, keep=2)
    assert list_checkpoints(folder) == [30, 40]
    assert latest_checkpoint(folder).endswith("step-000040.pt")
    assert not [f for f in os.listdir(folder) if ".tmp" in f]
    assert load_checkpoint(latest_checkpoint(folder))["w"].tolist() == [40.0, 40.0]


def test_the_best_checkpoint_is_kept_beside_the_last_ones(tmp_path):
    folder = str(tmp_path / "ck")
    assert best_checkpoint(folder) is None
    for step, best in ((10, True), (20, False), (30, True), (40, False), (50, False), (60, False)):
        save_checkpoint(folder, step, {"step": step}, keep=2, best=best)
    assert list_checkpoints(folder) == [30, 50, 60]  # step 10 went once 30 was the best
    assert best_checkpoint(folder).endswith("step-000030.pt")
    assert load_checkpoint(best_checkpoint(folder))["step"] == 30
    save_checkpoint(folder, 70, {"step": 70}, keep=2, best=True)
    assert list_checkpoints(folder) == [60, 70] and best_checkpoint(folder).endswith("step-000070.pt")
    point_best(folder, None)
    assert best_checkpoint(folder) is None and sorted(os.listdir(folder)) == ["latest", "step-000060.pt",
                                                                             "step-000070.pt"]
    point_best(folder, 20)  # a pointer to a checkpoint that is gone names nothing
    assert best_checkpoint(folder) is None


def test_latest_falls_back_to_the_highest_complete_checkpoint(tmp_path):
    folder = str(tmp_path / "ck")
    save_checkpoint(folder, 5, {"step": 5}, keep=3)
    (tmp_path / "ck" / "step-000009.pt.tmp-123").write_bytes(b"partial")  # a writer died mid-way
    os.remove(os.path.join(folder, "latest"))
    assert latest_checkpoint(folder).endswith("step-000005.pt")


def test_load_refuses_arbitrary_pickles(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"obj": np.random.default_rng(0)}, path)  # a class outside the weights_only allowlist
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    path = str(tmp_path / "rng.pt")
    save_checkpoint(str(tmp_path), 1, {"rng": rng_state()}, keep=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    set_rng_state(load_checkpoint(os.path.join(str(tmp_path), "step-000001.pt"))["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
    assert not os.path.exists(path)


def test_a_cut_or_foreign_file_is_a_clear_error(tmp_path):
    folder = str(tmp_path / "ck")
    path = save_checkpoint(folder, 1, {"step": 1, "w": torch.ones(1000)}, keep=1)
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"step-000001.pt \(1000 bytes\) cannot be read"):
        load_checkpoint(path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt \(0 bytes\) cannot be read"):
        load_checkpoint(str(tmp_path / "empty.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def _torch_save_on_a_full_disk(state, f):
    """What torch.save does when the disk fills: some bytes written, then its own error raised while
    handling the OSError."""
    import errno

    f.write(b"PK\x03\x04" + b"\0" * 4096)
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1003456 vs 1003344") from None


def test_a_checkpoint_that_meets_a_full_disk_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    import errno

    folder = str(tmp_path / "ck")
    save_checkpoint(folder, 5, {"step": 5}, keep=3)
    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    with pytest.raises(OSError) as caught:
        save_checkpoint(folder, 10, {"step": 10}, keep=3)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("step-000010.pt")
    assert sorted(os.listdir(folder)) == ["latest", "step-000005.pt"]  # no partial file, the last one kept
    assert latest_checkpoint(folder).endswith("step-000005.pt")
