import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxredit.cli import main
from cxredit.data.io import read_xray, to_square
from cxredit.data.prepare import prepare_store
from cxredit.data.store import ImageStore, StoreError, StoreWriter, assign_splits


def _folder(tmp_path, n=12, with_bad=True):
    """A folder of real PNG/JPEG files with patients sharing images, plus corrupt files."""
    root = tmp_path / "raw"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = (40, 52) if i % 2 else (56, 44)
        arr = (rng.random((h, w)) * 255).astype(np.uint8)
        arr[:, : w // 2] //= 3  # some structure so resizing is not trivial
        ext = "png" if i % 3 else "jpg"
        Image.fromarray(arr).save(root / f"img{i:02d}.{ext}")
        rows.append({"file": f"img{i:02d}.{ext}", "patient_id": f"p{i // 2}",
                     "Cardiomegaly": float(i % 2), "No Finding": float(1 - i % 2)})
    if with_bad:
        good = (root / "img00.jpg").read_bytes()
        (root / "broken.jpg").write_bytes(good[: len(good) // 3])
        (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 4)
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return root


def test_assign_splits_patient_level_and_stable():
    ids = [f"patient{i:05d}" for i in range(3000)] * 2
    s = assign_splits(ids)
    assert list(s[:3000]) == list(s[3000:])  # all images of a patient share a split
    frac = pd.Series(s).value_counts(normalize=True)
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["test"] - 0.1) < 0.03
    # independent of the rest of the dataset
    assert assign_splits(ids[:10])[5] == s[5]
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(ids, (0.5, 0.1, 0.1))


def test_prepare_folder_roundtrip_values_labels_errors(tmp_path):
    root = _folder(tmp_path)
    out = tmp_path / "store"
    rc = main(["prepare", "folder", "--root", str(root), "--out", str(out), "--resolution", "16",
               "--labels-csv", str(tmp_path / "labels.csv"), "--no-progress"])
    assert rc == 0
    store = ImageStore(out)
    assert len(store) == 12 and store.resolution == 16
    errors = pd.read_csv(out / "errors.csv")
    assert sorted(p.split("/")[-1] for p in errors["path"]) == ["broken.dcm", "broken.jpg"]
    assert all(isinstance(r, str) and r for r in errors["reason"])
    info = json.loads((out / "store.json").read_text())
    assert info["counts"]["errors"] == 2 and info["format_version"] == 1
    assert not (out / ".partial").exists()
    # pixel values equal the reader + resizer applied directly (within one grey level: the
    # prepare path resizes 8-bit files in integer arithmetic)
    for i, path in enumerate(store.meta["path"]):
        ref = to_square(read_xray(path), 16).astype(int)
        assert np.abs(store.images[i].astype(int) - ref).max() <= 1, path
    # labels joined, splits by patient
    m = store.meta
    assert set(m["split"]) <= {"train", "val", "test"}
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()
    card = store.select(query="Cardiomegaly==1")
    assert len(card) == 6 and (store.labels(["Cardiomegaly"], card) == 1).all()
    healthy = store.select(query="`No Finding`==1")
    assert set(card).isdisjoint(healthy)


def test_prepare_resumes_after_interruption_and_matches_full_run(tmp_path):
    root = _folder(tmp_path, n=40, with_bad=True)
    from cxredit.data.sources import index_folder

    df = index_folder(root)
    full = prepare_store(df, tmp_path / "full", 16, progress=False)
    assert full.images == 40 and full.errors == 2
    part = prepare_store(df, tmp_path / "part", 16, progress=False, stop_after=1)
    assert part.images == 0 and (tmp_path / "part" / ".partial").exists()
    state = np.load(tmp_path / "part" / ".partial" / "state.npy")
    assert 0 < (state > 0).sum() < len(df)  # some rows finished, some not
    with pytest.raises(StoreError, match="not a cxredit store"):
        ImageStore(tmp_path / "part")
    resumed = prepare_store(df, tmp_path / "part", 16, progress=False)
    assert resumed.resumed and resumed.images == 40 and resumed.errors == 2
    a, b = ImageStore(tmp_path / "full"), ImageStore(tmp_path / "part")
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    pd.testing.assert_frame_equal(a.meta, b.meta)
    # different inputs into the same unfinished folder are refused
    prepare_store(df, tmp_path / "other", 16, progress=False, stop_after=1)
    with pytest.raises(StoreError, match="different inputs"):
        prepare_store(df, tmp_path / "other", 32, progress=False)
    with pytest.raises(StoreError, match="already exists"):
        prepare_store(df, tmp_path / "full", 16, progress=False)


def test_prepare_workers_give_identical_store(tmp_path):
    root = _folder(tmp_path, n=10, with_bad=False)
    from cxredit.data.sources import index_folder

    df = index_folder(root)
    prepare_store(df, tmp_path / "w1", 16, workers=1, progress=False)
    prepare_store(df, tmp_path / "w2", 16, workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(ImageStore(tmp_path / "w1").images),
                                  np.asarray(ImageStore(tmp_path / "w2").images))


def _tiny_store(tmp_path, n=20, r=8):
    plan = pd.DataFrame({"path": [f"x{i}" for i in range(n)],
                         "patient_id": [f"p{i}" for i in range(n)],
                         "Cardiomegaly": [float(i % 2) for i in range(n)]})
    w = StoreWriter(tmp_path / "s", plan, r, info={"source": "test"}, with_masks=True)
    for i in range(n):
        w.put(i, np.full((r, r), i * 12, np.uint8), np.full((3, r, r), i % 2, np.uint8),
              {"extra": i * 10})
    w.finish()
    return ImageStore(tmp_path / "s")


def test_dataset_and_batches_values(tmp_path):
    store = _tiny_store(tmp_path)
    assert store.meta["extra"].tolist() == [i * 10 for i in range(20)]
    ds = store.dataset(label_columns=("Cardiomegaly",), with_masks=True)
    item = ds[3]
    assert item["image"].shape == (1, 8, 8) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"], torch.full((1, 8, 8), 36 * 2 / 255 - 1))
    assert item["labels"].tolist() == [1.0] and item["masks"].shape == (3, 8, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False)
    first = next(iter(loader))
    assert first["image"].shape == (6, 1, 8, 8) and first["index"].tolist() == list(range(6))
    # batches: shuffled with a seeded generator, reproducible, covering every row once
    b1 = [b.index for b in store.iter_batches(6, shuffle=True,
                                              generator=np.random.default_rng(1))]
    b2 = [b.index for b in store.iter_batches(6, shuffle=True,
                                              generator=np.random.default_rng(1))]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    assert sorted(torch.cat(b1).tolist()) == list(range(20))
    batch = next(store.iter_batches(4, rows=np.array([5, 1, 9]), label_columns=["Cardiomegaly"]))
    assert batch.index.tolist() == [5, 1, 9]
    expect = torch.tensor([5, 1, 9]).float().mul(12 * 2 / 255).sub(1)
    assert torch.allclose(batch.images[:, 0, 0, 0], expect)
    assert batch.labels[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert len(list(store.iter_batches(6, drop_last=True))) == 3
    with pytest.raises(ValueError, match="unknown split"):
        store.select(split="training")


def test_info_cli(tmp_path, capsys):
    _tiny_store(tmp_path)
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["images"] == 20 and s["has_masks"] and sum(s["splits"].values()) == 20
    assert s["labels"]["Cardiomegaly"] == {"positive": 10, "negative": 10, "uncertain": 0,
                                           "missing": 0}
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "not a cxredit store" in capsys.readouterr().err


def test_phantoms_cli_writes_an_ordinary_store_with_masks(tmp_path):
    args = ["phantoms", "--n", "24", "--resolution", "32", "--cardiomegaly-fraction", "0.25",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--seed", "3", "--workers", "2"]) == 0
    assert main(args + ["--out", str(tmp_path / "c"), "--seed", "4"]) == 0
    a, b, c = (ImageStore(tmp_path / x) for x in "abc")
    assert a.masks.shape == (24, 3, 32, 32) and a.images.shape == (24, 32, 32)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))  # deterministic
    np.testing.assert_array_equal(np.asarray(a.masks), np.asarray(b.masks))
    m = a.meta
    assert int(m["Cardiomegaly"].sum()) == 6  # exactly round(24 * 0.25)
    assert ((m["ctr"] > 0.5) == (m["Cardiomegaly"] == 1)).all()
    assert set(m["source"]) == {"phantom"} and set(m["view"]) == {"PA"}
    assert set(m["subject_seed"]).isdisjoint(set(c.meta["subject_seed"]))
    # the heart mask is where the stored CTR says: wider hearts for cardiomegaly cases
    heart_w = (np.asarray(a.masks[:, 0]).max(axis=1)).sum(axis=1)
    assert heart_w[m["Cardiomegaly"] == 1].mean() > heart_w[m["Cardiomegaly"] == 0].mean()
    assert a.dataset(with_masks=True)[0]["masks"].shape == (3, 32, 32)
    assert main(["phantoms", "--out", str(tmp_path / "d"), "--n", "0"]) == 2


def test_phantoms_resume_refuses_other_generator_settings(tmp_path, monkeypatch):
    import cxredit.data.prepare as prep

    real = prep.render_chunk

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "render_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        prep.make_phantom_store(tmp_path / "p", 8, 16, 0.0, device_probs=(0.0, 0.0),
                                progress=False)
    monkeypatch.setattr(prep, "render_chunk", real)
    # same images and size, other labels / confounders: not the same preparation
    with pytest.raises(StoreError, match=r"cardiomegaly_fraction \(was 0.0\)"):
        prep.make_phantom_store(tmp_path / "p", 8, 16, 1.0, device_probs=(0.0, 0.0),
                                progress=False)
    with pytest.raises(StoreError, match=r"device_probs \(was \[0.0, 0.0\]\)"):
        prep.make_phantom_store(tmp_path / "p", 8, 16, 0.0, device_probs=(1.0, 1.0),
                                progress=False)
    res = prep.make_phantom_store(tmp_path / "p", 8, 16, 0.0, device_probs=(0.0, 0.0),
                                  progress=False)
    assert res.resumed and ImageStore(tmp_path / "p").meta["Cardiomegaly"].sum() == 0
