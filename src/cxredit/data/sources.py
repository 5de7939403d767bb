"""Dataset indexers: CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14 and plain folders.

Every indexer returns a :class:`pandas.DataFrame` whose first columns are exactly
:data:`SCHEMA` (source-specific extras follow):

==============  ===========================================================
``path``        absolute path of the image file (str)
``patient_id``  str; the unit for patient-level splits
``study_id``    str, unique across patients
``view``        upper case: ``PA``, ``AP``, ``LATERAL``, ``LL``, ... or ``""``
``sex``         ``"M"``, ``"F"`` or ``""``
``age``         float years, NaN when unknown
``source``      ``chexpert`` / ``mimic`` / ``nih`` / ``folder``
observations    the 14 CheXpert observations as float: 1 positive, 0 negative,
                -1 uncertain, NaN not mentioned
==============  ===========================================================

Files listed in the official CSVs are not checked for existence (a stat per row
is too slow at 220k rows); :mod:`cxredit.data.prepare` reports missing ones.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxredit.data.io import DICOM_EXTENSIONS, SUPPORTED_EXTENSIONS, VIEW_CODE_MEANINGS, dicom_view

log = logging.getLogger(__name__)

OBSERVATIONS: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
SCHEMA: list[str] = ["path", "patient_id", "study_id", "view", "sex", "age", "source",
                     *OBSERVATIONS]
SOURCES = ("chexpert", "mimic", "nih", "folder")
UNCERTAIN_POLICIES = ("keep", "zero", "one", "drop")

_STR_COLUMNS = ("path", "patient_id", "study_id", "view", "sex", "source")
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


def _abs_root(root: str | os.PathLike, what: str) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(root)))
    if not path.is_dir():
        raise ValueError(f"{what}: dataset folder not found: {path}")
    return path


def _finalize(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Add missing schema columns, fix dtypes, put SCHEMA first and extras after."""
    df = df.reset_index(drop=True).copy()
    df["source"] = source
    for col in _STR_COLUMNS:
        if col not in df:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str)
    df["age"] = pd.to_numeric(df["age"], errors="coerce") if "age" in df else np.nan
    for col in OBSERVATIONS:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    df[["age", *OBSERVATIONS]] = df[["age", *OBSERVATIONS]].astype("float64")
    extras = [c for c in df.columns if c not in SCHEMA]
    return df[SCHEMA + extras]


def _norm(values: pd.Series, fn: Callable[[str], object]) -> pd.Series:
    """``fn(stripped str)`` per value, computed once per distinct value; NaN -> ""."""
    values = values.fillna("").astype(str)
    return values.map({v: fn(v.strip()) for v in values.unique()})


def _read_csv(path: Path, required: Iterable[str], what: str, **kw: object) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, **kw)
    except Exception as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: {path} lacks columns {missing}; has {list(df.columns)}")
    return df


def _first_bad(bad: pd.Series, values: pd.Series, col: str, csv: Path, what: str,
               expect: str) -> None:
    """Raise a one-line error naming the file, row, column and value of the first bad cell."""
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        v = values.iloc[i]
        shown = "a blank" if pd.isna(v) or str(v).strip() == "" else \
            f"{float(v):g}" if isinstance(v, (int, float, np.number)) else repr(v)
        raise ValueError(f"{what}: {csv}, row {i + 1} (after the header): column {col!r} holds "
                         f"{shown}; expected {expect} ({int(bad.sum())} such rows)")


def _numbers(raw: pd.DataFrame, col: str, csv: Path, what: str,
             allowed: Sequence[float] | None = None) -> pd.Series:
    """Column `col` as float64 (blank -> NaN); any other non-number (or value outside
    `allowed`) is an error naming the file and row."""
    values = raw[col]
    out = pd.to_numeric(values, errors="coerce")
    blank = values.isna()
    if values.dtype == object:
        blank |= values.astype(str).str.strip() == ""
    bad = ~blank & out.isna()
    if allowed is not None:
        bad |= ~blank & ~out.isin(allowed)
    expect = "a number or blank" if allowed is None else \
        f"{', '.join(f'{a:g}' for a in allowed)} or blank"
    _first_bad(bad, values, col, csv, what, expect)
    return out.astype("float64")


def _whole_numbers(raw: pd.DataFrame, col: str, csv: Path, what: str) -> pd.Series:
    """Column `col` (an id) as int64; a blank or non-integer cell is an error naming the row."""
    out = pd.to_numeric(raw[col], errors="coerce")
    _first_bad(out.isna() | (out % 1 != 0), raw[col], col, csv, what, "a whole number")
    return out.astype("int64")


_LABEL_VALUES = (1.0, 0.0, -1.0)


def _find_file(folders: Sequence[Path], stem: str, what: str, required: bool = True) -> Path | None:
    """First of ``<folder>/<stem>`` or ``<folder>/<stem>.gz`` that exists."""
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    if required:
        raise ValueError(f"{what}: expected {stem} (or {stem}.gz) in {folders[0]}")
    return None


# ---------------------------------------------------------------------------- CheXpert


def _chexpert_dir(root: Path) -> Path:
    if (root / "train.csv").is_file() or (root / "valid.csv").is_file():
        return root
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "train.csv").is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"CheXpert: several dataset folders in {root}: "
                         f"{[p.name for p in found]}; pass one of them as root")
    raise ValueError(f"CheXpert: expected train.csv in {root} or in a subfolder such as "
                     f"{root / 'CheXpert-v1.0-small'}")


def index_chexpert(
    root: str | os.PathLike, splits: Sequence[str] = ("train", "valid")
) -> pd.DataFrame:
    """Index CheXpert v1.0 or v1.0-small (Irvin et al., AAAI 2019).

    Args:
        root: The dataset folder (holding ``train.csv``, e.g. ``CheXpert-v1.0-small/``)
            or the folder containing it.
        splits: Which ``<split>.csv`` files to read.

    Returns:
        SCHEMA columns plus ``official_split`` (the CSV it came from; the store makes
        its own patient-level ``split``). Image paths are rebuilt from the last four
        components of the CSV's ``Path`` (``<split>/<patient>/<study>/<view>.jpg``)
        under the dataset folder, so a renamed dataset folder still works.
        ``view`` is ``LATERAL`` for lateral films, else the ``AP/PA`` value (AP, PA,
        LL, RL; ``""`` when blank). Labels are the official 1/0/-1/blank.
    """
    folder = _chexpert_dir(_abs_root(root, "CheXpert"))
    required = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    frames = []
    for split in splits:
        csv = folder / f"{split}.csv"
        if not csv.is_file():
            raise ValueError(f"CheXpert: expected {csv} (split {split!r})")
        raw = _read_csv(csv, required, "CheXpert", dtype={"Path": str, "Sex": str,
                                                          "Frontal/Lateral": str, "AP/PA": str})
        # Plain Python beats pandas' object-string methods here (223k rows: ~10x).
        prefix = str(folder) + os.sep
        paths = raw["Path"].fillna("").tolist()
        parts = [p.replace("\\", "/").rsplit("/", 4) for p in paths]
        short = pd.Series([len(q) < 4 or not all(q[-4:]) for q in parts])
        _first_bad(short, raw["Path"], "Path", csv, "CheXpert",
                   "<split>/<patient>/<study>/<view>.jpg")
        lateral = _norm(raw["Frontal/Lateral"], str.lower) == "lateral"
        df = pd.DataFrame({
            "path": [prefix + os.sep.join(q[-4:]) for q in parts],
            "patient_id": [q[-3] for q in parts],
            "study_id": [f"{q[-3]}/{q[-2]}" for q in parts],
            "view": np.where(lateral, "LATERAL", _norm(raw["AP/PA"], str.upper)),
            "sex": _norm(raw["Sex"], lambda v: _SEX.get(v.lower(), "")),
            "age": _numbers(raw, "Age", csv, "CheXpert"),
        })
        for col in OBSERVATIONS:
            df[col] = _numbers(raw, col, csv, "CheXpert", _LABEL_VALUES).to_numpy()
        df["official_split"] = split
        frames.append(df)
    return _finalize(pd.concat(frames, ignore_index=True), "chexpert")


# ---------------------------------------------------------------------------- MIMIC

def index_mimic(root: str | os.PathLike) -> pd.DataFrame:
    """Index MIMIC-CXR-JPG 2.0.0 (Johnson et al., 2019, arXiv:1901.07042).

    Reads ``mimic-cxr-2.0.0-metadata.csv(.gz)`` joined with
    ``mimic-cxr-2.0.0-chexpert.csv(.gz)`` on (subject_id, study_id); studies without
    a label row get NaN labels. Images are expected at
    ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg``. Optional files in ``root``:
    ``mimic-cxr-2.0.0-split.csv(.gz)`` adds ``official_split``; MIMIC-IV ``patients.csv(.gz)``
    fills ``sex`` (gender) and ``age`` (``anchor_age``: age in the anchor year, not at
    the study).

    Args:
        root: The folder holding the CSVs and ``files/`` (PhysioNet's
            ``mimic-cxr-jpg/2.0.0``; ``root/2.0.0`` is also tried).

    Returns:
        SCHEMA columns plus ``dicom_id``, ``study_date``, ``rows``, ``columns`` and
        ``official_split`` when available. ``view`` is ViewPosition, or when blank the
        ViewCodeSequence meaning (postero-anterior -> PA, ...).
    """
    base = _abs_root(root, "MIMIC-CXR-JPG")
    folders = [base, base / "2.0.0", base / "mimic-cxr-jpg" / "2.0.0"]
    meta_csv = _find_file(folders, "mimic-cxr-2.0.0-metadata.csv", "MIMIC-CXR-JPG")
    folder = meta_csv.parent
    label_csv = _find_file([folder], "mimic-cxr-2.0.0-chexpert.csv", "MIMIC-CXR-JPG")
    ids = ["subject_id", "study_id"]
    meta = _read_csv(meta_csv, ["dicom_id", *ids, "ViewPosition"], "MIMIC-CXR-JPG",
                     dtype={"dicom_id": str, "ViewPosition": str,
                            "ViewCodeSequence_CodeMeaning": str})
    dup = meta["dicom_id"].duplicated()
    if dup.any():  # one image, listed twice: store it once
        log.warning("MIMIC-CXR-JPG: %s lists %d dicom_id(s) more than once; each is kept once",
                    meta_csv, int(dup.sum()))
        meta = meta[~dup].reset_index(drop=True)
    labels = _read_csv(label_csv, [*ids, *OBSERVATIONS], "MIMIC-CXR-JPG")
    for col in ids:
        meta[col] = _whole_numbers(meta, col, meta_csv, "MIMIC-CXR-JPG")
        labels[col] = _whole_numbers(labels, col, label_csv, "MIMIC-CXR-JPG")
    for col in OBSERVATIONS:
        labels[col] = _numbers(labels, col, label_csv, "MIMIC-CXR-JPG", _LABEL_VALUES)
    labels = labels[[*ids, *OBSERVATIONS]].drop_duplicates(ids)
    meta = meta.merge(labels, on=ids, how="left", validate="many_to_one")

    subject = [str(v) for v in meta["subject_id"].tolist()]
    study = [str(v) for v in meta["study_id"].tolist()]
    view = _norm(meta["ViewPosition"], str.upper)
    if "ViewCodeSequence_CodeMeaning" in meta:
        coded = _norm(meta["ViewCodeSequence_CodeMeaning"],
                      lambda v: VIEW_CODE_MEANINGS.get(v.lower(), ""))
        view = view.where(view != "", coded)
    files = str(folder / "files") + os.sep
    sep = os.sep
    df = pd.DataFrame({
        "path": [f"{files}p{p[:2]}{sep}p{p}{sep}s{s}{sep}{d}.jpg"
                 for p, s, d in zip(subject, study, meta["dicom_id"].tolist())],
        "patient_id": subject,
        "study_id": study,
        "view": view,
        "dicom_id": meta["dicom_id"],
    })
    df[OBSERVATIONS] = meta[OBSERVATIONS].to_numpy(dtype="float64")
    for src, dst in (("StudyDate", "study_date"), ("Rows", "rows"), ("Columns", "columns")):
        if src in meta:
            df[dst] = meta[src]

    split_csv = _find_file([folder], "mimic-cxr-2.0.0-split.csv", "", required=False)
    if split_csv is not None:
        split = _read_csv(split_csv, ["dicom_id", "split"], "MIMIC-CXR-JPG",
                          dtype={"dicom_id": str})
        df["official_split"] = df["dicom_id"].map(split.drop_duplicates("dicom_id")
                                                  .set_index("dicom_id")["split"])
    patients_csv = _find_file([folder, base], "patients.csv", "", required=False)
    if patients_csv is not None:
        patients = _read_csv(patients_csv, ["subject_id", "gender", "anchor_age"], "MIMIC-IV")
        patients = patients.drop_duplicates("subject_id")
        patients.index = patients["subject_id"].astype("int64").astype(str)
        df["sex"] = df["patient_id"].map(patients["gender"]).fillna("").str.lower().map(_SEX)
        df["age"] = df["patient_id"].map(patients["anchor_age"])
    return _finalize(df, "mimic")


# ---------------------------------------------------------------------------- NIH

# NIH finding -> CheXpert observation. Infiltration has no CheXpert twin; "Lung
# Opacity" is its closest parent. Mass and Nodule are both CheXpert "Lung Lesion".
NIH_TO_OBSERVATION = {
    "No Finding": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax",
    "Atelectasis": "Atelectasis",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pneumonia": "Pneumonia",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Infiltration": "Lung Opacity",
}
_AGE_UNITS = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}


def _nih_images(root: Path) -> dict[str, str]:
    """File name -> path for ``images/`` and ``images_*/images/`` (as downloaded)."""
    found: dict[str, str] = {}
    tops = sorted(e.path for e in os.scandir(root) if e.is_dir() and e.name.startswith("images"))
    for top in tops:
        for folder in (top, os.path.join(top, "images")):
            if not os.path.isdir(folder):
                continue
            for entry in os.scandir(folder):
                if entry.is_file():
                    found.setdefault(entry.name, entry.path)
    return found


def _parse_age(values: pd.Series) -> pd.Series:
    """Years from ``58``, ``58.0`` or the 2017 release's ``058Y`` / ``006M`` / ``020D``."""
    return _norm(values, _age_years).astype("float64")


def _age_years(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([YMWD]?)", text.strip().upper())
    return float(match[1]) / _AGE_UNITS[match[2]] if match else np.nan


def index_nih(root: str | os.PathLike) -> pd.DataFrame:
    """Index NIH ChestX-ray14 (Wang et al., "ChestX-ray8", CVPR 2017).

    Reads ``Data_Entry_2017*.csv`` (``Data_Entry_2017_v2020.csv`` preferred) and finds
    images by file name in ``images/`` or ``images_*/images/``; unmatched names get
    a path under ``images/`` so prepare reports them missing.

    Labels: NIH's 14 findings are exhaustive text-mined labels, so every observation
    with an NIH counterpart (:data:`NIH_TO_OBSERVATION`) is 1 when present and 0
    otherwise; Enlarged Cardiomediastinum, Pleural Other, Fracture and Support
    Devices have no NIH counterpart and stay NaN. There is no uncertain (-1) label.
    Infiltration is mapped to Lung Opacity, which CheXpert also uses for other
    opacities, so Lung Opacity=0 does not rule out e.g. a consolidation here.

    Args:
        root: The folder holding the CSV and the image folders.

    Returns:
        SCHEMA columns plus ``finding_labels`` (the raw NIH string), ``followup`` and
        ``official_split`` (train/test from ``train_val_list.txt``/``test_list.txt`` if present).
        ``study_id`` is ``<patient>_<follow-up>``.
    """
    root = _abs_root(root, "NIH ChestX-ray14")
    csvs = sorted(root.glob("Data_Entry_2017*.csv"), key=lambda p: ("v2020" not in p.name, p.name))
    if not csvs:
        raise ValueError(f"NIH ChestX-ray14: expected Data_Entry_2017_v2020.csv "
                         f"(or Data_Entry_2017.csv) in {root}")
    required = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                "Patient Gender", "View Position"]
    raw = _read_csv(csvs[0], required, "NIH ChestX-ray14",
                    dtype={"Image Index": str, "Finding Labels": str, "Patient Age": str})
    raw = raw.loc[:, ~raw.columns.str.startswith("Unnamed")]

    names = raw["Image Index"].str.strip()
    images = _nih_images(root)
    default = str(root / "images") + os.sep
    patient = _whole_numbers(raw, "Patient ID", csvs[0], "NIH ChestX-ray14").astype(str)
    followup = _whole_numbers(raw, "Follow-up #", csvs[0], "NIH ChestX-ray14")
    df = pd.DataFrame({
        "path": [images.get(n, default + n) for n in names],
        "patient_id": patient,
        "study_id": patient + "_" + followup.astype(str),
        "view": _norm(raw["View Position"], str.upper),
        "sex": _norm(raw["Patient Gender"], lambda v: _SEX.get(v.lower(), "")),
        "age": _parse_age(raw["Patient Age"]),
    })
    # ~800 distinct label strings for 112k rows: map each once.
    labels = raw["Finding Labels"].fillna("").astype(str)
    codes, uniques = pd.factorize(labels)
    table = np.zeros((len(uniques), len(OBSERVATIONS)))
    for u, text in enumerate(uniques):
        for finding in text.split("|"):
            obs = NIH_TO_OBSERVATION.get(finding.strip())
            if obs is not None:
                table[u, OBSERVATIONS.index(obs)] = 1.0
    mapped = [OBSERVATIONS.index(o) for o in dict.fromkeys(NIH_TO_OBSERVATION.values())]
    blank = (labels.str.strip() == "").to_numpy()  # no label text: unknown, not "all absent"
    if blank.any():
        log.warning("NIH: %d rows of %s have no Finding Labels; their labels are left blank",
                    int(blank.sum()), csvs[0])
    for j in mapped:
        df[OBSERVATIONS[j]] = np.where(blank, np.nan, table[codes, j])
    df["finding_labels"] = raw["Finding Labels"].fillna("")
    df["followup"] = followup
    split = _nih_split(root)
    if split:
        df["official_split"] = names.map(split)
    missing = int((~names.isin(images.keys())).sum())
    if missing:
        log.info("NIH: %d of %d listed images not found under %s", missing, len(names), root)
    return _finalize(df, "nih")


def _nih_split(root: Path) -> dict[str, str]:
    split: dict[str, str] = {}
    for name, value in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        if (root / name).is_file():
            for line in (root / name).read_text().split():
                split[line.strip()] = value
    return split


# ---------------------------------------------------------------------------- folder

_KEY_COLUMNS = ("file", "filename", "path")
# Mask-file columns of a labels CSV, in the channel order of masks.npy
# (cxredit.data.phantom.MASK_NAMES: heart, right lung, left lung; not imported, it pulls scipy).
MASK_COLUMNS: tuple[str, ...] = ("mask_heart", "mask_right_lung", "mask_left_lung")
_ALIASES = {  # canonical spellings (see _canonical) of schema fields in a labels CSV
    "patient id": "patient_id", "patientid": "patient_id", "patient": "patient_id",
    "subject id": "patient_id", "study id": "study_id", "studyid": "study_id",
    "study": "study_id", "view": "view", "view position": "view", "viewposition": "view",
    "projection": "view", "sex": "sex", "gender": "sex", "patient gender": "sex",
    "patient sex": "sex", "age": "age", "patient age": "age",
}


def _canonical(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).lower().split())


def index_folder(
    root: str | os.PathLike, labels_csv: str | os.PathLike | None = None
) -> pd.DataFrame:
    """Index every PNG/JPEG/DICOM file under ``root`` (recursive, sorted).

    Hidden files and folders (starting with ``.``) are skipped. Without labels,
    ``patient_id`` and ``study_id`` are the file stem. ``view`` comes from the labels
    CSV, else for DICOM files from the header (ViewPosition, or the ViewCodeSequence
    meaning), else it is ``""``: :func:`filter_views` keeps unknown views by default,
    i.e. PNG/JPEG images without a view are treated as frontal.

    Args:
        root: Folder to scan. Extensions (any case): .png .jpg .jpeg .dcm .dicom.
        labels_csv: Optional CSV joined on a ``file``, ``filename`` or ``path``
            column: a bare name matches the file name (which must then be unique),
            a relative path matches the path under ``root``, an absolute path matches
            exactly. Observation columns are recognised ignoring case, ``_`` and ``-``
            (``pleural_effusion`` -> ``Pleural Effusion``) and must hold 1/0/-1/blank;
            ``patient_id``, ``study_id``, ``view``, ``sex`` (or ``gender``) and
            ``age`` fill the schema; ``mask_heart``, ``mask_right_lung`` and
            ``mask_left_lung`` name mask files (see below); any other column is kept
            as an extra.

    Masks: the three mask columns (spelled as above, case, ``_`` and ``-`` ignored) must
    come together. Each cell names an image file of the same pixel size as its X-ray
    (PNG, GIF, BMP, ...; any bit depth; nonzero = inside), relative to the CSV's folder
    or absolute; the index holds them as absolute paths, ``""`` where blank. Mask files
    that lie under ``root`` are not indexed as X-rays. ``mask_right_lung`` is the
    *patient's* right lung, which is on the image's left in a PA film: the naming of the
    SCR database (van Ginneken et al., MedIA 2006, masks for JSRT). SCR's masks are
    1024x1024 for the 2048x2048 JSRT images: resize one to match the other first.
    :func:`cxredit.data.prepare.prepare_store` then also writes ``masks.npy`` (in
    :data:`MASK_COLUMNS` order); a row with a blank, missing, unreadable or wrongly
    sized mask is skipped and listed in ``errors.csv``, since a segmenter cannot learn
    from a partly annotated image.

    Returns:
        SCHEMA columns plus the CSV's extra columns.
    """
    root = _abs_root(root, "folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files.extend(os.path.join(dirpath, f) for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower()
                     in SUPPORTED_EXTENSIONS)
    if not files:
        raise ValueError(f"folder: no PNG/JPEG/DICOM files ({', '.join(SUPPORTED_EXTENSIONS)}) "
                         f"under {root}")
    files.sort()
    stems = [Path(f).stem for f in files]
    df = pd.DataFrame({"path": files, "patient_id": stems, "study_id": stems, "view": ""})
    if labels_csv is not None:
        df = _join_labels(df, root, Path(labels_csv))
    blank = df["view"].fillna("").astype(str).str.strip() == ""
    dcm = df["path"].map(lambda p: os.path.splitext(p)[1].lower() in DICOM_EXTENSIONS)
    if (blank & dcm).any():
        df.loc[blank & dcm, "view"] = [dicom_view(p) for p in df.loc[blank & dcm, "path"]]
    return _finalize(df, "folder")


def _join_labels(df: pd.DataFrame, root: Path, csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise ValueError(f"folder: labels CSV not found: {csv}")
    labels = _read_csv(csv, [], "folder labels", dtype=str)
    by_lower = {str(c).strip().lower(): c for c in labels.columns}
    key = next((by_lower[k] for k in _KEY_COLUMNS if k in by_lower), None)
    if key is None:
        raise ValueError(f"folder labels: {csv} needs a 'file', 'filename' or 'path' column; "
                         f"has {list(labels.columns)}")
    if labels[key].isna().any() or labels[key].duplicated().any():
        raise ValueError(f"folder labels: column {key!r} of {csv} has empty or duplicate entries")

    rel = [Path(p).relative_to(root).as_posix() for p in df["path"]]
    names = [Path(p).name for p in df["path"]]
    dup = pd.Series(names).duplicated(keep=False).to_numpy()
    repeated = {n for n, d in zip(names, dup) if d}
    lookup: dict[str, dict[str, int]] = {
        "abs": {p: i for i, p in enumerate(df["path"])},
        "rel": {p: i for i, p in enumerate(rel)},
        "name": {n: i for i, n in enumerate(names) if n not in repeated},
    }
    rows = np.full(len(labels), -1)
    for j, raw_key in enumerate(labels[key]):
        k = raw_key.strip().replace("\\", "/").removeprefix("./")
        kind = "abs" if os.path.isabs(k) else "rel" if "/" in k else "name"
        if kind == "abs":
            k = os.path.normpath(k)
        if kind == "name" and k in repeated:
            raise ValueError(f"folder labels: file name {k!r} occurs more than once under "
                             f"{root}; use relative paths in column {key!r}")
        rows[j] = lookup[kind].get(k, -1)
    if (rows < 0).any():
        missing = labels[key][rows < 0].tolist()
        log.warning("folder labels: %d rows of %s match no file (e.g. %s)",
                    len(missing), csv, missing[:3])

    matched = labels[rows >= 0].drop(columns=[key])
    matched.index = rows[rows >= 0]
    obs = {_canonical(o): o for o in OBSERVATIONS}
    masks = {_canonical(m): m for m in MASK_COLUMNS}
    csv_dir = Path(os.path.abspath(csv)).parent
    for col in matched.columns:
        canon, values = _canonical(col), matched[col]
        if canon in obs:
            _set_column(df, obs[canon], _label_values(values, col, csv))
        elif canon in _ALIASES:
            _set_column(df, _ALIASES[canon], _field_values(_ALIASES[canon], values))
        elif canon in masks:
            _set_column(df, masks[canon], _mask_paths(values, csv_dir))
        else:
            _set_column(df, col, _maybe_numeric(values))
    return _split_off_masks(df, csv)


def _mask_paths(values: pd.Series, base: Path) -> pd.Series:
    """Absolute, normalised mask paths (relative ones are under ``base``); blank -> NaN."""
    def resolve(v: str) -> object:
        if not v:
            return np.nan
        return os.path.normpath(os.path.join(base, os.path.expanduser(v.replace("\\", "/"))))

    return _norm(values, resolve)


def _split_off_masks(df: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """Check the mask columns come as a set, and drop mask files from the X-ray list."""
    present = [c for c in MASK_COLUMNS if c in df]
    if not present:
        return df
    if len(present) < len(MASK_COLUMNS):
        raise ValueError(f"folder labels: {csv} has mask column(s) {present} but lacks "
                         f"{[c for c in MASK_COLUMNS if c not in df]}; the three mask columns "
                         f"{list(MASK_COLUMNS)} come together")
    for col in MASK_COLUMNS:
        df[col] = df[col].fillna("").astype(str)
    mask_files = set(df[list(MASK_COLUMNS)].to_numpy().ravel()) - {""}
    is_mask = df["path"].isin(mask_files)
    if is_mask.any():
        log.info("folder: %d mask files under the root are not indexed as X-rays",
                 int(is_mask.sum()))
    return df[~is_mask]


def _set_column(df: pd.DataFrame, name: str, values: pd.Series) -> None:
    """Write the CSV's non-blank values (indexed by file row) into ``df[name]``."""
    if name in df:  # schema defaults (file stem, "") stay where the CSV is blank
        column, values = df[name].astype(object), values.dropna()
        column.loc[values.index] = values
        df[name] = column
    else:
        df[name] = values.reindex(df.index)


def _label_values(values: pd.Series, col: str, csv: Path) -> pd.Series:
    out = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & (values.str.strip() != "") & ~out.isin([1, 0, -1])
    if bad.any():
        raise ValueError(f"folder labels: column {col!r} of {csv} must hold 1, 0, -1 or blank; "
                         f"found {values[bad].iloc[0]!r}")
    return out.astype("float64")


def _field_values(field: str, values: pd.Series) -> pd.Series:
    values = values.str.strip()
    if field == "sex":
        return values.str.lower().map(_SEX).fillna("")
    if field == "age":
        return _parse_age(values)
    if field == "view":
        return values.fillna("").str.upper()
    return values  # ids stay strings ("007" is not 7)


def _maybe_numeric(values: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(values)
    except (TypeError, ValueError):
        return values


# ---------------------------------------------------------------------------- selection


def filter_views(
    df: pd.DataFrame, views: Iterable[str] = ("PA", "AP"), keep_unknown: bool = True
) -> pd.DataFrame:
    """Keep rows whose ``view`` is in ``views`` (case-insensitive).

    Args:
        df: An index frame.
        views: Views to keep, e.g. ``("PA",)``.
        keep_unknown: Also keep ``view == ""``. True by default because folder
            images carry no view and CheXpert frontal films with a blank AP/PA field
            are frontal; pass False for strict filtering.

    Returns:
        The selected rows; the index is kept, so they can be traced back.
    """
    if isinstance(views, str):
        views = [views]
    wanted = {v.strip().upper() for v in views}
    mask = df["view"].isin(wanted)
    if keep_unknown:
        mask |= df["view"] == ""
    return df[mask]


def apply_uncertain(
    df: pd.DataFrame, policy: str, columns: Iterable[str] | str = OBSERVATIONS
) -> pd.DataFrame:
    """Resolve uncertain (-1) labels (the U-Ignore/U-Zeros/U-Ones policies of CheXpert).

    Args:
        df: An index frame.
        policy: ``keep`` (leave -1), ``zero`` (-1 -> 0), ``one`` (-1 -> 1) or ``drop``
            (remove rows with -1 in any of ``columns``).
        columns: Label columns the policy applies to.

    Returns:
        A new frame; ``drop`` keeps the index of the remaining rows.
    """
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
    cols = [columns] if isinstance(columns, str) else list(columns)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"apply_uncertain: unknown label columns {missing}")
    out = df.copy()
    if policy in ("zero", "one"):
        out[cols] = out[cols].replace(-1, 0.0 if policy == "zero" else 1.0)
    elif policy == "drop":
        out = out[~(out[cols] == -1).any(axis=1)]
    return out


_LITERALS = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`[^`]*`)""")


def _quote_columns(expr: str, columns: Iterable[object]) -> str:
    """Backtick-quote column names that are not identifiers ("No Finding" -> `No Finding`)."""
    special = sorted((c for c in columns if isinstance(c, str) and not c.isidentifier()),
                     key=len, reverse=True)
    if not special:
        return expr
    pattern = re.compile("|".join(rf"(?<![\w`]){re.escape(c)}(?![\w`])" for c in special))

    def quote(match: re.Match[str]) -> str:
        return f"`{match.group(0)}`"

    pieces = _LITERALS.split(expr)  # odd pieces are string literals / quoted names
    return "".join(p if i % 2 else pattern.sub(quote, p) for i, p in enumerate(pieces))


def query(df: pd.DataFrame, expr: str) -> pd.DataFrame:
    """Select rows with a pandas query in which column names may contain spaces.

    Examples: ``"No Finding==1"``, ``"Cardiomegaly==1 and view=='PA'"``,
    ``"`Pleural Effusion`!=1 and age>=18"``.

    Args:
        df: An index frame.
        expr: A :meth:`pandas.DataFrame.query` expression; names with spaces may be
            written bare.

    Returns:
        The selected rows; the index is kept, so they can be traced back.

    Raises:
        ValueError: one line naming the expression and the available columns.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"empty query {expr!r}; available columns: {', '.join(map(str, df))}")
    try:
        out = df.query(_quote_columns(expr, df.columns), engine="python")
        if not isinstance(out, pd.DataFrame):
            raise TypeError("the expression does not select rows")
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ValueError(f"invalid query {expr!r} ({reason}); available columns: "
                         f"{', '.join(map(str, df.columns))}") from err
    return out


def index_source(kind: str, root: str | os.PathLike, **kw: object) -> pd.DataFrame:
    """Index a dataset by kind: ``chexpert``, ``mimic``, ``nih`` or ``folder``.

    Args:
        kind: One of :data:`SOURCES`.
        root: Dataset folder.
        **kw: Passed to the indexer (``splits`` for CheXpert, ``labels_csv`` for folder).
    """
    indexers: dict[str, Callable[..., pd.DataFrame]] = {
        "chexpert": index_chexpert, "mimic": index_mimic, "nih": index_nih,
        "folder": index_folder,
    }
    key = str(kind).strip().lower()
    if key not in indexers:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {', '.join(SOURCES)}")
    accepted = list(inspect.signature(indexers[key]).parameters)[1:]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(f"{key}: unexpected options {unknown}; accepted: {accepted}")
    return indexers[key](root, **kw)
