"""Tests for cxredit.data.sources on small fake trees with the official CSV layouts."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxredit.data.sources import (
    OBSERVATIONS,
    SCHEMA,
    apply_uncertain,
    filter_views,
    index_chexpert,
    index_folder,
    index_mimic,
    index_nih,
    index_source,
    query,
)

NAN = np.nan


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 100).save(path)
    return path


def _check_schema(df: pd.DataFrame, source: str) -> None:
    assert list(df.columns[: len(SCHEMA)]) == SCHEMA
    assert (df["source"] == source).all()
    for col in ["age", *OBSERVATIONS]:
        assert df[col].dtype == np.float64, col
    assert all(os.path.isabs(p) for p in df["path"])
    values = df[OBSERVATIONS].to_numpy()
    assert np.isin(values[~np.isnan(values)], [1, 0, -1]).all()


# ---------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
                   "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,"
                   "Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                   "Support Devices")
# 14 label fields after AP/PA, in the official order.
CHEXPERT_TRAIN = [
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
    "1.0,,,,,,,,,,,,,",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Male,87,Frontal,PA,"
    ",,-1.0,,,1.0,,,,,0.0,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Male,87,Lateral,,"
    ",,-1.0,,,1.0,,,,,0.0,,,1.0",
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Unknown,41,Frontal,AP,"
    ",,1.0,-1.0,,,,,,,,,,",
]
CHEXPERT_VALID = [
    "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,"
    "0.0,1.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0",
]


@pytest.fixture()
def chexpert(tmp_path: Path) -> Path:
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    for split, rows in (("train", CHEXPERT_TRAIN), ("valid", CHEXPERT_VALID)):
        (folder / f"{split}.csv").write_text("\n".join([CHEXPERT_HEADER, *rows]) + "\n")
        for row in rows:
            _image(tmp_path / row.split(",")[0])
    return tmp_path


@pytest.mark.parametrize("use_parent", [True, False])
def test_chexpert_schema_and_values(chexpert, use_parent):
    root = chexpert if use_parent else chexpert / "CheXpert-v1.0-small"
    df = index_chexpert(root)
    _check_schema(df, "chexpert")
    assert len(df) == 5
    assert df["official_split"].tolist() == ["train"] * 4 + ["valid"]
    assert all(Path(p).is_file() for p in df["path"])
    assert df["path"][0] == str(chexpert / "CheXpert-v1.0-small/train/patient00001/study1"
                                "/view1_frontal.jpg")
    assert df["patient_id"].tolist() == ["patient00001", "patient00002", "patient00002",
                                         "patient00003", "patient64541"]
    assert df["study_id"][1] == "patient00002/study2" == df["study_id"][2]
    assert df["view"].tolist() == ["AP", "PA", "LATERAL", "AP", "AP"]
    assert df["sex"].tolist() == ["F", "M", "M", "", "M"]
    assert df["age"].tolist() == [68, 87, 87, 41, 73]
    row = df.iloc[1]
    assert row["Cardiomegaly"] == -1 and row["Edema"] == 1 and row["Pleural Effusion"] == 0
    assert row["Support Devices"] == 1 and np.isnan(row["No Finding"])
    assert df["No Finding"][0] == 1 and np.isnan(df["Cardiomegaly"][0])
    assert df["Lung Opacity"][3] == -1
    assert df.loc[4, OBSERVATIONS].notna().all()


def test_chexpert_renamed_folder_and_split_selection(chexpert):
    renamed = chexpert / "my_chexpert"
    (chexpert / "CheXpert-v1.0-small").rename(renamed)
    df = index_chexpert(renamed, splits=("valid",))
    assert len(df) == 1 and Path(df["path"][0]).is_file()


def test_chexpert_errors(tmp_path, chexpert):
    with pytest.raises(ValueError, match="train.csv"):
        index_chexpert(tmp_path / "CheXpert-v1.0-small" / "train")
    with pytest.raises(ValueError, match="test.csv"):
        index_chexpert(chexpert, splits=("test",))
    with pytest.raises(ValueError, match="not found"):
        index_chexpert(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("Path,Sex\nx.jpg,Male\n")
    with pytest.raises(ValueError, match="lacks columns"):
        index_chexpert(bad)


@pytest.mark.parametrize("column, value, expect", [
    ("Path", "", r"row 2 .*column 'Path' holds a blank; expected <split>/<patient>"),
    ("Path", "patient00001t/view1.jpg", r"row 2 .*'patient00001t/view1.jpg'"),
    ("Cardiomegaly", "yes", r"row 2 .*column 'Cardiomegaly' holds 'yes'; expected 1, 0, -1"),
    ("Cardiomegaly", "2", r"column 'Cardiomegaly' holds 2;"),
    ("Age", "old", r"column 'Age' holds 'old'; expected a number"),
])
def test_chexpert_bad_cells_name_file_row_and_column(chexpert, column, value, expect):
    csv = chexpert / "CheXpert-v1.0-small" / "train.csv"
    df = pd.read_csv(csv, dtype=str)
    df.loc[1, column] = value
    df.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=expect) as info:
        index_chexpert(chexpert)
    assert str(info.value).startswith("CheXpert: " + str(csv)) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- MIMIC

MIMIC_META = """\
dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,\
StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,\
PatientOrientationCodeSequence_CodeMeaning
a1,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),\
postero-anterior,Erect
a2,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,\
CHEST (PA AND LAT),lateral,Erect
b1,10000764,57375967,CHEST (PORTABLE AP),AP,2705,2539,21321015,85323.0,CHEST (PORTABLE AP),\
antero-posterior,
c1,19999987,58971208,,,3056,2544,21451104,51729.0,CHEST (PA AND LAT),postero-anterior,Erect
"""
# The released chexpert.csv lists observations alphabetically: join must be by name.
MIMIC_LABELS = """\
subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,\
Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,\
Pneumothorax,Support Devices
10000032,50414267,,,,,,,,,1.0,,,,,
10000764,57375967,,-1.0,,,,,,,,1.0,,0.0,,
"""


@pytest.fixture()
def mimic(tmp_path: Path) -> Path:
    with gzip.open(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        f.write(MIMIC_META)
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text(MIMIC_LABELS)
    for rel in ("p10/p10000032/s50414267/a1.jpg", "p10/p10000032/s50414267/a2.jpg",
                "p10/p10000764/s57375967/b1.jpg"):  # c1 is missing on disk: still indexed
        _image(tmp_path / "files" / rel)
    return tmp_path


def test_mimic_schema_and_values(mimic):
    df = index_mimic(mimic)
    _check_schema(df, "mimic")
    assert df["dicom_id"].tolist() == ["a1", "a2", "b1", "c1"]
    assert [Path(p).is_file() for p in df["path"]] == [True, True, True, False]
    assert df["path"][2] == str(mimic / "files/p10/p10000764/s57375967/b1.jpg")
    assert df["path"][3] == str(mimic / "files/p19/p19999987/s58971208/c1.jpg")
    assert df["patient_id"].tolist() == ["10000032", "10000032", "10000764", "19999987"]
    assert df["study_id"][0] == "50414267"
    assert df["view"].tolist() == ["PA", "LATERAL", "AP", "PA"]  # c1 from ViewCodeSequence
    assert df["No Finding"][0] == 1 and df["No Finding"][1] == 1
    b1 = df.iloc[2]
    assert (b1["Cardiomegaly"], b1["Pleural Effusion"], b1["Pneumonia"]) == (-1, 1, 0)
    assert np.isnan(b1["Edema"])
    assert df.loc[3, OBSERVATIONS].isna().all()  # no label row for c1's study
    assert (df["sex"] == "").all() and df["age"].isna().all()
    assert "official_split" not in df


def test_mimic_optional_split_and_patients(mimic):
    (mimic / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\na1,50414267,10000032,train\n"
        "b1,57375967,10000764,test\n")
    (mimic / "patients.csv").write_text(
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n"
        "10000032,F,52,2180,2014 - 2016,\n10000764,M,86,2132,2014 - 2016,\n")
    df = index_mimic(mimic)
    assert df["official_split"][0] == "train" and df["official_split"][2] == "test"
    assert df["official_split"][[1, 3]].isna().all()
    assert df["sex"].tolist() == ["F", "F", "M", ""]
    np.testing.assert_array_equal(df["age"], [52, 52, 86, NAN])


def test_nih_blank_finding_labels_are_unknown(tmp_path, caplog):
    rows = [*NIH_ROWS[:2], NIH_ROWS[2].replace("No Finding", "")]
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER, *rows]))
    df = index_nih(tmp_path)
    assert np.isnan(df.loc[2, "No Finding"]) and np.isnan(df.loc[2, "Cardiomegaly"])
    assert df.loc[0, "Cardiomegaly"] == 1 and df.loc[0, "No Finding"] == 0
    assert "no Finding Labels" in caplog.text


def test_mimic_and_nih_blank_ids_name_file_and_row(mimic, tmp_path):
    (mimic / "mimic-cxr-2.0.0-chexpert.csv").write_text(MIMIC_LABELS.replace("10000764,", ",", 1))
    with pytest.raises(ValueError, match=r"chexpert.csv, row 2 .*'subject_id' holds a blank; "
                                         r"expected a whole number"):
        index_mimic(mimic)
    nih = tmp_path / "nih"
    nih.mkdir()
    rows = [*NIH_ROWS[:2], NIH_ROWS[2].replace(",0,2,81,", ",0,,81,")]
    (nih / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER, *rows]))
    with pytest.raises(ValueError, match=r"Data_Entry_2017.csv, row 3 .*'Patient ID'"):
        index_nih(nih)


def test_mimic_repeated_dicom_id_kept_once(mimic, caplog):
    with gzip.open(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        f.write(MIMIC_META + MIMIC_META.splitlines()[1] + "\n")
    df = index_mimic(mimic)
    assert df["dicom_id"].tolist() == ["a1", "a2", "b1", "c1"]
    assert "more than once" in caplog.text


def test_mimic_missing_csv(tmp_path):
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-metadata\.csv"):
        index_mimic(tmp_path)
    with gzip.open(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        f.write(MIMIC_META)
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv"):
        index_mimic(tmp_path)


# ---------------------------------------------------------------------------- NIH

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171",
    "00000003_000.png,Hernia|Infiltration|Mass|Effusion,0,3,74,F,AP,2500,2048,0.168,0.168",
    "00000004_000.png,Nodule,0,4,6,F,AP,2048,2500,0.168,0.168",
]


@pytest.fixture()
def nih(tmp_path: Path) -> Path:
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join([NIH_HEADER, *NIH_ROWS]))
    _image(tmp_path / "images_001/images/00000001_000.png")
    _image(tmp_path / "images_001/images/00000001_001.png")
    _image(tmp_path / "images_002/images/00000002_000.png")
    _image(tmp_path / "images/00000003_000.png")  # flat layout also found
    return tmp_path


def test_nih_schema_and_values(nih):
    df = index_nih(nih)
    _check_schema(df, "nih")
    assert df["path"][0] == str(nih / "images_001/images/00000001_000.png")
    assert df["path"][2] == str(nih / "images_002/images/00000002_000.png")
    assert df["path"][3] == str(nih / "images/00000003_000.png")
    assert df["path"][4] == str(nih / "images/00000004_000.png")  # listed but missing: kept
    assert not Path(df["path"][4]).exists()
    assert df["patient_id"].tolist() == ["1", "1", "2", "3", "4"]
    assert df["study_id"].tolist() == ["1_0", "1_1", "2_0", "3_0", "4_0"]
    assert df["view"].tolist() == ["PA", "PA", "PA", "AP", "AP"]
    assert df["sex"].tolist() == ["M", "M", "M", "F", "F"]
    assert df["age"].tolist() == [57, 58, 81, 74, 6]
    assert df["Cardiomegaly"].tolist() == [1, 1, 0, 0, 0]
    assert df["No Finding"].tolist() == [0, 0, 1, 0, 0]
    assert df["Lung Lesion"].tolist() == [0, 0, 0, 1, 1]  # Mass and Nodule
    assert df["Lung Opacity"].tolist() == [0, 0, 0, 1, 0]  # Infiltration
    assert df["Pleural Effusion"].tolist() == [0, 0, 0, 1, 0]
    for col in ("Enlarged Cardiomediastinum", "Pleural Other", "Fracture", "Support Devices"):
        assert df[col].isna().all(), col
    assert df["finding_labels"][3] == "Hernia|Infiltration|Mass|Effusion"
    assert "Unnamed: 11" not in df.columns


def test_nih_2017_release_ages_and_trailing_column(tmp_path):
    rows = ["00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,",
            "00000002_000.png,No Finding,0,2,006M,F,AP,2500,2048,0.171,0.171,"]
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER + ",", *rows]) + "\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n")
    df = index_nih(tmp_path)
    _check_schema(df, "nih")
    np.testing.assert_allclose(df["age"], [58, 0.5])
    assert df["official_split"].tolist() == ["train", "test"]
    assert not any(c.startswith("Unnamed") for c in df.columns)


def test_nih_missing_csv(tmp_path):
    with pytest.raises(ValueError, match="Data_Entry_2017"):
        index_nih(tmp_path)


# ---------------------------------------------------------------------------- folder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "xrays"
    _image(root / "a" / "x1.png")
    _image(root / "a" / "x2.PNG")
    (root / "b").mkdir()
    (root / "b" / "scan.dcm").write_bytes(b"not read by the indexer")
    (root / "b" / "photo.JPEG").write_bytes(b"")
    (root / "notes.txt").write_text("ignored")
    _image(root / ".hidden.png")
    _image(root / ".cache" / "y.png")
    return root


def test_folder_without_labels(folder):
    df = index_folder(folder)
    _check_schema(df, "folder")
    assert [Path(p).relative_to(folder).as_posix() for p in df["path"]] == [
        "a/x1.png", "a/x2.PNG", "b/photo.JPEG", "b/scan.dcm"]
    assert df["patient_id"].tolist() == ["x1", "x2", "photo", "scan"]
    assert (df["view"] == "").all() and df[OBSERVATIONS].isna().all().all()
    assert len(filter_views(df)) == 4  # unknown view counts as frontal
    assert len(filter_views(df, keep_unknown=False)) == 0


def test_folder_with_labels(folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,Cardiomegaly,pleural_effusion,patient_id,view,sex,age,ctr,site\n"
                   "x1.png,1,-1,007,pa,Female,44,0.55,A\n"
                   "x2.PNG,0,,008,,M,,0.41,B\n"
                   "gone.png,1,1,009,PA,F,50,0.6,C\n")
    df = index_folder(folder, labels_csv=csv)
    _check_schema(df, "folder")
    assert df["patient_id"].tolist() == ["007", "008", "photo", "scan"]
    assert df["view"].tolist() == ["PA", "", "", ""]
    assert df["sex"].tolist() == ["F", "M", "", ""]
    np.testing.assert_array_equal(df["age"], [44, NAN, NAN, NAN])
    np.testing.assert_array_equal(df["Cardiomegaly"], [1, 0, NAN, NAN])
    np.testing.assert_array_equal(df["Pleural Effusion"], [-1, NAN, NAN, NAN])
    np.testing.assert_allclose(df["ctr"], [0.55, 0.41, NAN, NAN])
    assert df["site"].tolist()[:2] == ["A", "B"]
    assert list(df.columns[len(SCHEMA):]) == ["ctr", "site"]


def test_folder_labels_duplicate_names_and_bad_values(tmp_path):
    root = tmp_path / "imgs"
    _image(root / "a" / "dup.png")
    _image(root / "b" / "dup.png")
    csv = tmp_path / "l.csv"
    csv.write_text("file,Cardiomegaly\ndup.png,1\n")
    with pytest.raises(ValueError, match="more than once"):
        index_folder(root, labels_csv=csv)
    csv.write_text(f"path,Cardiomegaly\nb/dup.png,1\n{root / 'a' / 'dup.png'},0\n")
    df = index_folder(root, labels_csv=csv)
    assert df["Cardiomegaly"].tolist() == [0, 1]
    csv.write_text("file,Cardiomegaly\na/dup.png,yes\n")
    with pytest.raises(ValueError, match="1, 0, -1"):
        index_folder(root, labels_csv=csv)
    csv.write_text("name,Cardiomegaly\ndup.png,1\n")
    with pytest.raises(ValueError, match="'file', 'filename' or 'path'"):
        index_folder(root, labels_csv=csv)


def test_folder_empty(tmp_path):
    with pytest.raises(ValueError, match="no PNG/JPEG/DICOM"):
        index_folder(tmp_path)


# ---------------------------------------------------------------------------- selection


def test_filter_views(chexpert):
    df = index_chexpert(chexpert)
    assert filter_views(df)["view"].tolist() == ["AP", "PA", "AP", "AP"]
    assert filter_views(df, ("pa",))["patient_id"].tolist() == ["patient00002"]
    assert filter_views(df, "LATERAL").index.tolist() == [2]
    blank = df.copy()
    blank.loc[0, "view"] = ""
    assert 0 in filter_views(blank, ("PA",)).index
    assert 0 not in filter_views(blank, ("PA",), keep_unknown=False).index


def test_apply_uncertain_policies(chexpert):
    df = index_chexpert(chexpert)
    kept = apply_uncertain(df, "keep")
    assert kept is not df and kept["Cardiomegaly"][1] == -1
    zeros = apply_uncertain(df, "zero")
    assert zeros["Cardiomegaly"][1:4].tolist() == [0, 0, 1] and zeros["Lung Opacity"][3] == 0
    ones = apply_uncertain(df, "one")
    assert ones["Cardiomegaly"][1:4].tolist() == [1, 1, 1] and ones["Lung Opacity"][3] == 1
    assert np.isnan(ones["Cardiomegaly"][0])  # blanks stay NaN
    assert apply_uncertain(df, "drop", columns=["Cardiomegaly"]).index.tolist() == [0, 3, 4]
    assert apply_uncertain(df, "drop").index.tolist() == [0, 4]
    assert apply_uncertain(df, "zero", columns="Cardiomegaly")["Lung Opacity"][3] == -1
    assert df["Cardiomegaly"][1] == -1  # input untouched
    with pytest.raises(ValueError, match="policy"):
        apply_uncertain(df, "ignore")
    with pytest.raises(ValueError, match="Cardiomegally"):
        apply_uncertain(df, "zero", columns=["Cardiomegally"])


def test_query_with_spaces_and_errors(chexpert):
    df = index_chexpert(chexpert)
    assert query(df, "No Finding==1")["patient_id"].tolist() == ["patient00001"]
    assert query(df, "Cardiomegaly==1 and view=='AP'").index.tolist() == [3]
    assert query(df, "Pleural Effusion==0 and view!='LATERAL'").index.tolist() == [1, 4]
    assert query(df, "`Enlarged Cardiomediastinum`==1").index.tolist() == [4]
    assert query(df, "patient_id != 'No Finding' and age > 80").index.tolist() == [1, 2]
    assert len(query(df, "Support Devices==1 and official_split=='valid'")) == 1
    for bad in ("Cardiomegaly===1", "Cardiomegally==1", "   "):
        with pytest.raises(ValueError) as info:
            query(df, bad)
        message = str(info.value)
        assert "\n" not in message and "available columns" in message
        assert "No Finding" in message and (bad.strip() == "" or repr(bad) in message)


def test_index_source_dispatch(chexpert, nih, folder):
    assert len(index_source("chexpert", chexpert, splits=("valid",))) == 1
    assert index_source("NIH", nih)["source"][0] == "nih"
    assert len(index_source("folder", folder)) == 4
    with pytest.raises(ValueError, match="chexpert, mimic, nih, folder"):
        index_source("padchest", chexpert)
    with pytest.raises(ValueError, match="unexpected options"):
        index_source("nih", nih, splits=("train",))
    with pytest.raises(ValueError, match="mimic-cxr-2.0.0-metadata.csv"):
        index_source("mimic", folder)
