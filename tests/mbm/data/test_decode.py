import io
import json

import numpy as np
import pytest

from mbm.data.decode import decode_sample, load_npy
from mbm.data.errors import CorruptSample


def raw_with(arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    doc = {"id": "s1", "modalities": ["image"], "label": "cat"}
    return {"__key__": "k1", "json": json.dumps(doc).encode(), "image.npy": buf.getvalue()}


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_features_are_corrupt(dtype, bad):
    arr = np.ones((3, 4), dtype)
    arr[2, 1] = bad
    with pytest.raises(CorruptSample) as exn:
        decode_sample(raw_with(arr))
    assert exn.value.reason == "npy.nonfinite"


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4"])
def test_finite_extremes_pass_as_float16(dtype):
    # largest finite float16, smallest subnormal, negative zero: none may be taken for inf/NaN
    values = np.array([[65504.0, -65504.0, 6e-8, -0.0]], dtype)
    features = decode_sample(raw_with(values)).features["image"]
    assert features.dtype == np.float16
    np.testing.assert_array_equal(features, values.astype(np.float16))


def npy(arr: np.ndarray, version=None) -> bytes:
    buf = io.BytesIO()
    if version is None:
        np.save(buf, arr, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


FAST = [np.arange(12, dtype=dt).reshape(3, 4) for dt in
        ("<f2", ">f2", "<f4", ">f4", "<f8", "<i1", "<u2", ">i4", "<i8", "<c8", ">c16")]
FAST += [np.ones((2, 3), bool), np.array(2.5), np.zeros(0, "<f4"), np.zeros((0, 7), "<f2"),
         np.arange(5, dtype="<f2"), np.ones((2, 3, 4, 5), "<f4"), np.ones((70000,), "<f2")]
FALLBACK = [np.asfortranarray(np.arange(6, dtype="<f4").reshape(2, 3)), np.array(["ab", "c"]),
            np.zeros(2, dtype=[("a", "<i4"), ("b", "<f2")])]


@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("arr", FAST + FALLBACK, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_load_npy_matches_np_load(arr, version, monkeypatch):
    data = npy(arr, version)
    want = np.load(io.BytesIO(data), allow_pickle=False)
    if any(arr is a for a in FAST):  # parsed here, without np.load
        monkeypatch.setattr("mbm.data.decode._np_load", lambda _: pytest.fail("fell back to np.load"))
    got = load_npy(data)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(load_npy(data + b"trailing"), want)  # as np.load: extra bytes ignored


@pytest.mark.parametrize("arr", FAST[:6], ids=lambda a: a.dtype.str)
def test_truncated_npy_is_refused(arr):
    data = npy(arr)
    for cut in (1, 7, len(data) - arr.nbytes + 1, 11, 9, 5):
        with pytest.raises(ValueError):
            load_npy(data[:-cut])


def test_bad_magic_pickles_and_archives_are_refused():
    good = npy(np.ones((2, 2), "<f4"))
    for bad in (b"", b"\x93NUMP", b"\x92" + good[1:], good[:6] + b"\x09\x00" + good[8:], good[:9]):
        with pytest.raises(ValueError):
            load_npy(bad)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(pickled.getvalue())
    archive = io.BytesIO()
    np.savez(archive, a=np.ones(2))  # np.load would return an NpzFile, not an array
    with pytest.raises(ValueError, match="magic"):
        load_npy(archive.getvalue())


def test_header_with_a_lying_shape_is_refused():
    data = npy(np.ones((3, 4), "<f2")).replace(b"(3, 4)", b"(9, 4)")
    with pytest.raises(ValueError, match="truncated"):
        load_npy(data)
    with pytest.raises(CorruptSample) as exn:
        decode_sample({"__key__": "k", "json": b'{"id": "s", "modalities": ["text"]}', "text.npy": data})
    assert exn.value.reason == "npy.bad"


def test_only_the_modalities_read_are_decoded():
    raw = raw_with(np.ones((2, 4), "<f2"))
    raw["json"] = json.dumps({"id": "s1", "modalities": ["image", "audio"]}).encode()
    raw["audio.npy"] = b"not an array"  # never decoded: the model reads no audio
    assert set(decode_sample(raw, {"image": 4}).features) == {"image"}
    with pytest.raises(CorruptSample):
        decode_sample(raw)  # all listed modalities


def test_arrays_left_in_the_shard_decode_or_become_unreadable_rows(tmp_path):
    import webdataset as wds

    from mbm.data.shards import iter_tar

    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write(raw_with(arr))
    raw = next(iter_tar(str(path), lazy=True))
    np.testing.assert_array_equal(decode_sample(raw).features["image"], arr)
    path.write_bytes(path.read_bytes()[:600])  # cut after the scan
    with pytest.raises(CorruptSample) as exn:
        decode_sample(raw)
    assert exn.value.reason == "npy.unreadable" and "k1.image.npy" in str(exn.value)


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8"])
@pytest.mark.parametrize("big", [7e4, -65520.0, 1e30])
def test_finite_values_beyond_float16_are_out_of_range(dtype, big):
    arr = np.ones((3, 4), dtype)
    arr[1, 2] = big  # finite here, inf as float16 (-65520 rounds to -inf)
    with pytest.raises(CorruptSample) as exn:
        decode_sample(raw_with(arr))
    assert exn.value.reason == "npy.out_of_range" and "k1.image.npy" in str(exn.value)
    arr[1, 2] = 65519.0  # rounds to float16's largest, 65504
    assert decode_sample(raw_with(arr)).features["image"][1, 2] == 65504


def _lazy_samples(tmp_path, arrays):
    """Undecoded samples of a shard holding each of ``arrays`` as its image, arrays left in the shard."""
    import webdataset as wds

    from mbm.data.decode import undecoded
    from mbm.data.shards import iter_tar

    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, arr in enumerate(arrays):
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            doc = {"id": f"s{i}", "modalities": ["image"]}
            sink.write({"__key__": f"k{i}", "json": json.dumps(doc).encode(), "image.npy": buf.getvalue()})
    return path, [undecoded(raw) for raw in iter_tar(str(path), lazy=True)]


def test_native_float16_arrays_whose_rows_all_fit_are_read_into_place(tmp_path):
    from mbm.data.decode import InShard, decode, settle

    arrays = [np.arange(12, dtype="<f2").reshape(3, 4), np.ones((3, 4), ">f2"), np.ones((3, 4), "<f4"),
              np.ones((9, 4), "<f2"), np.ones((3, 5), "<f2")]
    _, samples = _lazy_samples(tmp_path, arrays)
    kinds = []
    for u in samples[:4]:
        got = decode(u, {"image": 4}, {"image": 8}).features["image"]
        kinds.append(type(got).__name__)
        if isinstance(got, InShard):
            out = np.empty(got.shape, np.float16)
            got.read_into(out)
            np.testing.assert_array_equal(out, decode(u, {"image": 4}).features["image"])
    # other byte orders and dtypes are converted as before, and more rows than a batch takes are pooled
    assert kinds == ["InShard", "ndarray", "ndarray", "ndarray"]
    with pytest.raises(CorruptSample, match="npy.dim"):  # a wrong width is refused as before, not deferred
        decode(samples[4], {"image": 4}, {"image": None})
    assert isinstance(settle(decode(samples[0], {"image": 4}, {"image": None})).features["image"], np.ndarray)


@pytest.mark.parametrize("damage", ["nonfinite", "cut"])
def test_an_array_read_into_place_is_checked_as_decode_checks_it(tmp_path, damage):
    from mbm.data.decode import decode, settle

    arr = np.ones((3, 4), "<f2")
    if damage == "nonfinite":
        arr[2, 3] = np.nan
    path, samples = _lazy_samples(tmp_path, [arr])
    lazy = decode(samples[0], {"image": 4}, {"image": None})
    if damage == "cut":
        path.write_bytes(path.read_bytes()[:600])  # cut after the scan
    reason = {"nonfinite": "npy.nonfinite", "cut": "npy.unreadable"}[damage]
    with pytest.raises(CorruptSample) as exn:
        lazy.features["image"].read_into(np.empty((3, 4), np.float16))
    assert exn.value.reason == reason and "k0.image.npy" in str(exn.value)
    with pytest.raises(CorruptSample) as again:
        settle(lazy, {"image": 4})  # the batch's second chance reads it whole, and refuses it for the same reason
    assert again.value.reason == reason


def test_a_sample_carries_the_content_hashes_its_doc_lists():
    raw = raw_with(np.ones((2, 4), np.float16))
    doc = {"id": "s1", "modalities": ["image"], "modality_hashes": {"image": "ab" * 32, "text": 3}}
    assert decode_sample({**raw, "json": json.dumps(doc).encode()}).content == {"image": "ab" * 32}  # strings only
    assert decode_sample(raw).content == {}  # a doc without them
