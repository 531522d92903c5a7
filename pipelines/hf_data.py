"""Image sets from the Hugging Face `datasets` library (a hub id or a local parquet/arrow copy), as a plain folder.

`--data hf:lambdalabs/naruto-blip-captions` or `--data path/to/train-*.parquet` is read with `datasets`, filtered
and captioned as a recipe says, and written once to a folder of PNGs + `metadata.jsonl`, the format every other
part of opdiff reads. The folder is keyed by the source, split, columns, filter and caption template, so a second
run reuses it without touching the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

HF_PREFIX = "hf:"
LOCAL_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
DONE_FILE = ".complete"


@dataclass(frozen=True)
class HFSource:
    """Where the images come from and how they become (image, caption) pairs."""

    source: str
    """`hf:<dataset id>`, a `.parquet`/`.arrow` file (or glob), a folder of them, or a `save_to_disk` folder."""
    split: str = "train"
    image_column: str = "image"
    caption_column: str | None = "text"
    """Column holding the caption; None when `caption_template` builds it."""
    caption_template: str | None = None
    """E.g. "A painting of genre {genre}": fields are columns; class-label columns give their label names."""
    filter: tuple[tuple[str, str], ...] = ()
    """Keep rows whose column equals the value; class-label columns compare by label name (`artist=claude-monet`)."""


def is_hf_source(data: str | Path) -> bool:
    """Return True when `data` names a hub dataset or a parquet/arrow copy rather than an image folder or zip."""
    s = str(data)
    return s.startswith(HF_PREFIX) or Path(s.split("*")[0]).suffix in LOCAL_FORMATS or (
        Path(s).is_dir() and (Path(s) / "dataset_info.json").exists())


def load_rows(src: HFSource):
    """Return the `datasets.Dataset` split `src` names. Raises RuntimeError saying what is needed when it is unreachable."""
    import datasets

    s = src.source
    try:
        if s.startswith(HF_PREFIX):
            return datasets.load_dataset(s[len(HF_PREFIX):], split=src.split)
        path = Path(s)
        if path.is_dir() and (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[src.split] if isinstance(ds, datasets.DatasetDict) else ds
        files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [s]
        kind = LOCAL_FORMATS.get(Path(files[0].split("*")[0]).suffix, "parquet") if files else "parquet"
        if not files:
            raise FileNotFoundError(f"no .parquet files in {path}")
        return datasets.load_dataset(kind, data_files={src.split: files}, split=src.split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; say what to do with any of them
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = ("the hub is unreachable (offline): download it once where the network allows "
                f"(`datasets.load_dataset('{s[len(HF_PREFIX):]}')` fills the cache) or pass a local parquet copy"
                if s.startswith(HF_PREFIX) else "check the path: a .parquet/.arrow file, a folder of them, or a "
                "`save_to_disk` folder")
        raise RuntimeError(f"cannot read dataset {s!r} (split {src.split!r}){' while offline' if offline else ''}: "
                           f"{type(e).__name__}: {e}\n  {hint}") from e


def _label(ds, column: str, value):
    """The label name of a class-label value, the value itself otherwise."""
    feature = ds.features.get(column)
    names = getattr(feature, "names", None)
    return names[value] if names is not None and isinstance(value, int) else value


def caption_for(ds, row: dict, src: HFSource) -> str:
    """Return the caption of one row: its caption column, or the template filled with (label names of) its columns."""
    if src.caption_template is None:
        return str(row[src.caption_column]).strip()
    fields = {c: str(_label(ds, c, row[c])).replace("_", " ") for c in ds.column_names if c != src.image_column}
    return src.caption_template.format(**fields)


def _keep(ds, src: HFSource):
    """Apply the filter on label names, without decoding images."""
    if not src.filter:
        return ds
    for column, _ in src.filter:
        if column not in ds.column_names:
            raise ValueError(f"filter column {column!r} is not in the dataset; columns: {', '.join(ds.column_names)}")
    light = ds.select_columns([c for c, _ in src.filter])
    keep = [i for i, row in enumerate(light) if all(str(_label(ds, c, row[c])) == v for c, v in src.filter)]
    return ds.select(keep)


def materialize(src: HFSource, cache_root: str | Path) -> Path:
    """Write the (filtered, captioned) split as PNGs + `metadata.jsonl` under `cache_root`; return that folder.

    Done once per source/settings: a finished folder is reused as is.
    """
    key = hashlib.sha256(json.dumps(asdict(src), sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cache_root) / f"hf-{key}"
    if (out / DONE_FILE).exists():
        return out
    ds = load_rows(src)
    for column in [src.image_column] + ([src.caption_column] if src.caption_template is None else []):
        if column not in ds.column_names:
            raise ValueError(f"column {column!r} is not in {src.source!r}; columns: {', '.join(ds.column_names)}")
    ds = _keep(ds, src)
    if len(ds) == 0:
        raise ValueError(f"no rows of {src.source!r} pass the filter {dict(src.filter)}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i, row in enumerate(tqdm(ds, desc=f"writing {src.source}", unit="img")):
            name = f"{i:06d}.png"
            row[src.image_column].convert("RGB").save(out / name)
            meta.write(json.dumps({"file_name": name, "text": caption_for(ds, row, src)}) + "\n")
    (out / "source.json").write_text(json.dumps(asdict(src), indent=2), encoding="utf-8")
    (out / DONE_FILE).touch()
    return out
