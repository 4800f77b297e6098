#!/usr/bin/env python
"""Build the vendored demo data set `src/hf_elastic/data_files/fine_foods/` from the Debian package `r-cran-modeldata`.

The package ships modeldata's `small_fine_foods` data (Amazon fine-food reviews; `training_data`, 4,000 rows, and
`testing_data`, 1,000 rows; columns `product`, `review`, `score` in {great, other}) inside R's lazy-load database
`usr/lib/R/site-library/modeldata/data/Rdata.{rdx,rdb}`. This script reads it in pure Python (PyPI `rdata`), cleans
the text and writes a small balanced, deterministic subset as JSONL together with its licence and provenance.

Usage:
    python scripts/build_demo_data.py                 # apt-get download r-cran-modeldata into a temporary folder
    python scripts/build_demo_data.py --deb FILE.deb  # use an already downloaded package

Selection rule (deterministic, no RNG):
    1. Clean each review: `<br />` becomes a newline, other HTML tags are dropped, HTML entities are unescaped,
       U+FFFD replacement characters are removed, runs of spaces are collapsed and the text is stripped.
    2. Drop reviews shorter than 20 characters, duplicates inside a split (first kept), and training reviews whose
       cleaned text also occurs in the test split.
    3. Per class, sort by SHA-256 of the cleaned text and keep the first N (train 600 + 600, test 200 + 200).
    4. Interleave and order the chosen rows by SHA-256 of "<split>:<text>", so any prefix of a file is a stable,
       roughly balanced sample.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import lzma
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "hf_elastic" / "data_files" / "fine_foods"
DEB_NAME = "r-cran-modeldata"
R_DATA_DIR = "usr/lib/R/site-library/modeldata/data"
COPYRIGHT = "usr/share/doc/r-cran-modeldata/copyright"
LABELS = {"other": 0, "great": 1}
PER_CLASS = {"train": 600, "test": 200}
MIN_CHARS = 20


def fetch_deb(workdir: Path) -> Path:
    """`apt-get download` the package into `workdir` and return the .deb path."""
    try:
        subprocess.run(["apt-get", "download", DEB_NAME], cwd=workdir, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit(f"apt-get is not available; download {DEB_NAME} yourself and pass --deb FILE.deb")
    except subprocess.CalledProcessError as err:
        sys.exit(f"`apt-get download {DEB_NAME}` failed (try `apt-get update` first):\n{err.stderr}")
    debs = sorted(workdir.glob(f"{DEB_NAME}_*.deb"))
    if not debs:
        sys.exit(f"`apt-get download {DEB_NAME}` produced no .deb in {workdir}")
    return debs[-1]


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def _unpack_entry(blob: bytes) -> bytes:
    """Decompress one entry of an R lazy-load database (R's `R_decompress1/2/3`)."""
    kind = blob[4:5]
    if kind == b"Z":  # raw LZMA2 stream, as written by R's xz compression
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        return lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=filters)
    if kind == b"2":
        import bz2

        return bz2.decompress(blob[5:])
    if kind == b"0":
        return blob[5:]
    return zlib.decompress(blob[4:])  # type 1: 4-byte length, then a zlib stream


def read_lazyload(data_dir: Path, names: list[str]) -> dict:
    """Read the named objects of `Rdata.rdb` through the index `Rdata.rdx`, converted with `rdata`."""
    import warnings

    from rdata.conversion import convert
    from rdata.parser import parse_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = convert(parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
        rdb = (data_dir / "Rdata.rdb").read_bytes()
        out = {}
        for name in names:
            offset, length = (int(v) for v in index["variables"][name])
            out[name] = convert(parse_data(_unpack_entry(rdb[offset : offset + length])))
    return out


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"<[^<>]{0,200}>")
_SPACES = re.compile(r"[ \t\u00a0]+")
_NEWLINES = re.compile(r"\s*\n\s*")


def clean(text: str) -> str:
    text = _BR.sub("\n", text)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\ufffd", "")
    text = _SPACES.sub(" ", text)
    return _NEWLINES.sub("\n", text).strip()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def select(frames: dict) -> tuple[dict[str, list[dict]], dict[str, int]]:
    cleaned = {}
    for split, name in (("train", "training_data"), ("test", "testing_data")):
        df = frames[name]
        seen: set[str] = set()
        rows = []
        for product, review, score in zip(df["product"], df["review"], df["score"], strict=True):
            text = clean(str(review))
            if len(text) < MIN_CHARS or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": LABELS[str(score)], "label_text": str(score), "product": str(product)})
        cleaned[split] = rows
    test_texts = {r["text"] for r in cleaned["test"]}
    cleaned["train"] = [r for r in cleaned["train"] if r["text"] not in test_texts]
    chosen = {}
    for split, rows in cleaned.items():
        picked = []
        for label in sorted(LABELS.values()):
            of_class = sorted((r for r in rows if r["label"] == label), key=lambda r: _sha(r["text"]))
            if len(of_class) < PER_CLASS[split]:
                sys.exit(f"Only {len(of_class)} rows of label {label} in {split}; need {PER_CLASS[split]}.")
            picked += of_class[: PER_CLASS[split]]
        chosen[split] = sorted(picked, key=lambda r: _sha(f"{split}:{r['text']}"))
    counts = {split: len(rows) for split, rows in cleaned.items()}
    counts |= {"raw_train": len(frames["training_data"]), "raw_test": len(frames["testing_data"])}
    return chosen, counts


def copyright_block(copyright_text: str) -> str:
    """The MIT licence text with the upstream (modeldata) copyright line, from Debian's machine-readable file."""
    holder = re.search(r"Files: \*\nCopyright: (.+)\n", copyright_text)
    licence = re.search(r"\nLicense: MIT\n((?: .*\n?)+)", copyright_text)
    if not holder or not licence:
        sys.exit("Unexpected format of the Debian copyright file; update copyright_block().")
    body = "\n".join("" if line.strip() == "." else line[1:] for line in licence.group(1).rstrip("\n").split("\n"))
    return f"MIT License\n\nCopyright (c) {holder.group(1).strip()}\n\n{body}\n"


def write_outputs(chosen, counts, deb: Path, version: str, copyright_text: str) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for split, rows in chosen.items():
        with (OUT_DIR / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (OUT_DIR / "LICENSE").write_text(copyright_block(copyright_text), encoding="utf-8")
    sizes = {s: {lab: sum(r["label_text"] == lab for r in rows) for lab in LABELS} for s, rows in chosen.items()}
    upstream = version.split("-")[0]
    digests = {s: hashlib.sha256((OUT_DIR / f"{s}.jsonl").read_bytes()).hexdigest() for s in chosen}
    readme = f"""# Amazon fine-food reviews (demo subset)

A small, balanced binary sentiment task for the offline `hf_elastic` demo: does a review give the product 5 stars
(`great`, label 1) or not (`other`, label 0)? Load it with `hf_elastic.data.load_fine_foods()`.

| split | rows | great (1) | other (0) |
|-------|------|-----------|-----------|
| train | {len(chosen["train"])} | {sizes["train"]["great"]} | {sizes["train"]["other"]} |
| test  | {len(chosen["test"])} | {sizes["test"]["great"]} | {sizes["test"]["other"]} |

Each line of `train.jsonl` / `test.jsonl` is `{{"text", "label", "label_text", "product"}}` (`product` is the Amazon
product id; every row has a different product, and no product or text occurs in both splits).

## Provenance

- Source: Debian package `{DEB_NAME}` version `{version}`
  (`{deb.name}`, Debian `main`, fetched with
  `apt-get download {DEB_NAME}`). It packages the CRAN package modeldata {upstream} by Max Kuhn and
  Posit Software, PBC (<https://github.com/tidymodels/modeldata>).
- File: `{R_DATA_DIR}/Rdata.rdb` (index `Rdata.rdx`),
  objects `training_data` ({counts["raw_train"]:,} rows) and `testing_data` ({counts["raw_test"]:,} rows) of the data
  set `small_fine_foods`, read in Python with PyPI `rdata`.
- Upstream: modeldata's help page for `small_fine_foods` cites the Stanford SNAP "Amazon Fine Foods" reviews,
  <https://snap.stanford.edu/data/web-FineFoods.html> (J. McAuley and J. Leskovec, "From amateurs to connoisseurs:
  modeling the evolution of user expertise through online reviews", WWW 2013). `score` is `great` for a 5-star
  rating and `other` otherwise.
- Rebuild with `python scripts/build_demo_data.py` (needs `apt-get` and PyPI `rdata`).

## Selection rule (deterministic)

1. Cleaning: `<br />` becomes a newline, other HTML tags are removed, HTML entities are unescaped, U+FFFD
   characters are removed, runs of spaces collapse and text is stripped.
2. Dropped: reviews under {MIN_CHARS} characters, duplicates within a split, and training reviews whose cleaned
   text is also in the test split. This leaves {counts["train"]} training and {counts["test"]} test candidates.
3. Balanced sampling: per class, sort candidates by SHA-256 of the cleaned text and keep the first
   {PER_CLASS["train"]} (train, from `training_data`) or {PER_CLASS["test"]} (test, from `testing_data`).
4. Row order: by SHA-256 of `"<split>:<text>"`, so a prefix of a file is a stable, roughly balanced sample.

The classes are balanced on purpose (the source is about 65% `great`), so the majority baseline is 50%.

SHA-256 of the files:

- `train.jsonl`: `{digests["train"]}`
- `test.jsonl`: `{digests["test"]}`

## Licence

modeldata, including its data, is distributed under the MIT licence. `LICENSE` reproduces the licence text and
the copyright line from the Debian package's `/usr/share/doc/{DEB_NAME}/copyright`.
modeldata's documentation states no separate licence for the review texts. The reviews were written by Amazon
users and collected by SNAP, so cite the SNAP source above when you redistribute them.
"""
    (OUT_DIR / "README.md").write_text(readme, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb", type=Path, help=f"a downloaded {DEB_NAME}_*.deb (default: apt-get download it)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hf_elastic_modeldata_") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # lets apt's unprivileged `_apt` user write the download when run as root
        deb = args.deb.resolve() if args.deb else fetch_deb(work)
        if shutil.which("dpkg-deb") is None:
            sys.exit("dpkg-deb is needed to unpack the .deb")
        root = work / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        version = deb_field(deb, "Version")
        frames = read_lazyload(root / R_DATA_DIR, ["training_data", "testing_data"])
        chosen, counts = select(frames)
        write_outputs(chosen, counts, deb, version, (root / COPYRIGHT).read_text(encoding="utf-8"))
    total = sum((OUT_DIR / name).stat().st_size for name in ("train.jsonl", "test.jsonl"))
    print(f"Wrote {OUT_DIR} ({', '.join(f'{s}: {len(r)}' for s, r in chosen.items())} rows, {total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
