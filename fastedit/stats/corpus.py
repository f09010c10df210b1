"""Generic text for the key statistics: local files/folders, Hugging Face datasets, or text sampled from the model.

A `Corpus` yields documents (strings) in a deterministic, seeded order. Its ``id`` identifies the content (a file
hash, a dataset name, the sampling settings) and is recorded in every cache file made from it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fastedit.stats.errors import CorpusError
from fastedit.stats.sampler import SamplerConfig, sample_rows, sampled_rows, special_prefix

__all__ = ["Corpus", "hub_corpus", "local_corpus", "model_corpus", "resolve_corpus", "special_prefix"]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TEXT_FIELDS = ("text", "content", "document", "article")

DEFAULT_DATASET = "wikitext-2"  # without --corpus: this data set when present (fastedit.data), else model text
MODEL_CORPUS = "model"  # --corpus model: text sampled from the model itself

DOC_CHARS = 4000  # text files: a document ends at a blank line or at the first line end after this many chars
SHUFFLE_BUFFER = 10_000  # documents; a file smaller than this is shuffled completely


@dataclass(frozen=True)
class Corpus:
    """A source of documents. ``documents(seed)`` is deterministic for a given seed."""

    kind: str  # "files" | "hub" | "model"
    id: str  # identifies the content; recorded in cache metadata
    slug: str  # short and filename-safe, used in cache file names
    describe: str  # for logs and errors
    finite: bool
    _documents: Callable[[int], Iterator[str]]
    # Corpora that come as token rows (model samples): (seed, n_tokens, row_len, progress bar?) -> rows of n_tokens
    # positions, each row_len long but the last; the statistics use them instead of packing documents. row_tokens
    # caps the row length (shorter rows are cheaper to sample; every position counts either way).
    rows: Callable[[int, int, int, bool], list[torch.Tensor]] | None = None
    row_tokens: int | None = None

    def documents(self, seed: int) -> Iterator[str]:
        return self._documents(seed)


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return slug[:max_len] or "x"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def shuffled(items: Iterable[Any], rng: random.Random, buffer: int = SHUFFLE_BUFFER) -> Iterator[Any]:
    """A seeded buffer shuffle: exact for streams shorter than ``buffer``, bounded memory for longer ones."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(buffer)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


# ---- local files -----------------------------------------------------------------------------------------

SNIFF_BYTES = 1 << 16  # the start of a text file checked for binary content


def check_text_file(path: Path) -> None:
    """Refuse a file whose first chunk is not UTF-8 text (NUL bytes or invalid UTF-8): a binary file would
    otherwise become statistics of replacement characters."""
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    problem = None
    nul = head.find(b"\x00")
    if nul >= 0:
        problem = f"a NUL byte at offset {nul}"
    else:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
        except UnicodeDecodeError as exc:
            problem = f"invalid UTF-8 at offset {exc.start}"
    if problem:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 text ({problem}): it looks binary; pass a UTF-8 text, JSON lines "
            "or parquet file"
        )


def _text_documents(path: Path) -> Iterator[str]:
    """Runs of non-blank lines, cut at blank lines or, at a line end, once ``DOC_CHARS`` long: contiguous text
    either way, and a file without blank lines (WikiText has one paragraph per line) still shuffles in chunks."""
    check_text_file(path)
    lines: list[str] = []
    size = 0
    with path.open(encoding="utf-8", errors="replace") as fh:  # a stray bad byte later on is replaced
        for line in fh:
            text = line.strip()
            if text:
                lines.append(text)
                size += len(text)
            if lines and (not text or size >= DOC_CHARS):
                yield "\n".join(lines)
                lines, size = [], 0
    if lines:
        yield "\n".join(lines)


def _record_text(record: Any, where: str) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with a text field or a string, got {type(record).__name__}")
    for key in TEXT_FIELDS:
        if isinstance(record.get(key), str):
            return record[key]
    raise CorpusError(
        f"{where}: no text field (looked for {', '.join(TEXT_FIELDS)}; found {', '.join(map(str, record)) or 'none'})"
        "; rename the text field to 'text'"
    )


def _jsonl_documents(path: Path) -> Iterator[str]:
    check_text_file(path)
    try:
        yield from _json_records(path)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 text (invalid byte {exc.object[exc.start : exc.start + 1]!r}"
            "); save it as UTF-8"
        ) from None


def _json_records(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        first = fh.read(1)
        fh.seek(0)
        if first == "[":  # a JSON array of records
            try:
                records = json.load(fh)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"corpus file {path} is not valid JSON ({exc})") from None
            for i, record in enumerate(records):
                text = _record_text(record, f"{path} record {i}")
                if text and text.strip():
                    yield text
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"corpus file {path} line {lineno} is not valid JSON ({exc})") from None
            text = _record_text(record, f"{path} line {lineno}")
            if text and text.strip():
                yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise CorpusError(f"corpus file {path} is not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    column = next((c for c in TEXT_FIELDS if c in names), None)
    if column is None:
        raise CorpusError(f"parquet corpus {path} has no text column (looked for {TEXT_FIELDS}; found {names})")
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _file_documents(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _text_documents(path)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_documents(path)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_documents(path)
    raise CorpusError(
        f"unknown corpus format {path.suffix or '(no suffix)'!r} for {path}; use a text file "
        f"({', '.join(TEXT_SUFFIXES)}), JSON lines ({', '.join(JSONL_SUFFIXES)}) or parquet, or a folder of them"
    )


def _file_identity(path: Path) -> str:
    """Content hash for files up to 256 MB, else name + size + mtime (hashing a huge corpus costs too much)."""
    stat = path.stat()
    if stat.st_size <= 256 << 20:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]
    return _short_hash(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")


# Files in a corpus folder that describe the data rather than hold it (hub snapshots carry a README.md, a
# LICENSE, a CITATION...; `datasets` save_to_disk folders their JSON metadata): skipped, never read as text.
METADATA_STEMS = ("readme", "license", "licence", "copying", "citation", "changelog", "notice", "authors", "model_card")
DATASETS_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")


def _is_metadata(relative: Path) -> bool:
    """A folder entry that is documentation, dataset metadata, or hidden (``.cache``, ``.gitattributes``)."""
    if any(part.startswith(".") for part in relative.parts):
        return True
    return relative.name.lower() in DATASETS_METADATA or relative.name.lower().split(".")[0] in METADATA_STEMS


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets.Dataset(Dict).save_to_disk`` (arrow files + JSON metadata)."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and any(path.glob("*.arrow")))
    )


def _check_readable(files: list[Path], location: str) -> None:
    """Open every file and parse its first document, so a bad file fails now (before any model loads)."""
    found = False
    for f in files:
        try:
            found = next(iter(_file_documents(f)), None) is not None or found
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"corpus file {f} is not UTF-8 text ({exc.reason}); pass text, JSON lines or parquet"
            ) from None
        except OSError as exc:
            raise CorpusError(f"corpus file {f} cannot be read ({exc.strerror or exc})") from None
    if not found:
        raise CorpusError(f"corpus {location!r} contains no text; pass a corpus with documents in it")


def local_corpus(location: str) -> Corpus:
    """A text/JSONL/parquet file, a folder of them, or a `datasets` save_to_disk folder, checked readable now."""
    path = Path(location).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {location!r} does not exist; pass an existing .txt/.jsonl/.parquet file or folder")
    if is_saved_dataset(path):
        return saved_dataset_corpus(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in KNOWN_SUFFIXES and not _is_metadata(p.relative_to(path))
        )
        if not files:
            raise CorpusError(
                f"corpus folder {location!r} holds no {'/'.join(KNOWN_SUFFIXES)} files (README, license and metadata "
                "files are skipped); add text files, pass a file, or a datasets save_to_disk folder"
            )
    else:
        if path.suffix.lower() not in KNOWN_SUFFIXES:
            _file_documents(path)  # raises the unknown-format error
        files = [path]
    for f in files:  # binary content fails now, before the model's time is spent
        if f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES:
            check_text_file(f)
    _check_readable(files, location)
    ident = _short_hash(
        ":".join(f"{f.relative_to(path) if path.is_dir() else f.name}={_file_identity(f)}" for f in files)
    )

    def documents(seed: int) -> Iterator[str]:
        rng = random.Random(seed)
        order = list(files)
        rng.shuffle(order)
        for f in order:
            yield from shuffled(_file_documents(f), rng)

    name = path.name or str(path)
    return Corpus("files", f"file:{name}:{ident}", f"{slugify(name, 32)}-{ident[:6]}", str(path), True, documents)


def _open_saved_dataset(path: Path) -> Any:
    """The dataset of a save_to_disk folder: a DatasetDict's ``train`` split (else its first split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise CorpusError(f"corpus {str(path)!r} is not a readable datasets save_to_disk folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise CorpusError(f"corpus {str(path)!r} is a DatasetDict without splits")
        split = "train" if "train" in ds else next(iter(ds))
        log.info("corpus %s: using split %r of %s", path, split, list(ds))
        ds = ds[split]
    column = next((c for c in TEXT_FIELDS if c in ds.column_names), None)
    if column is None:
        raise CorpusError(
            f"dataset {str(path)!r} has no text column (looked for {', '.join(TEXT_FIELDS)}; found "
            f"{', '.join(ds.column_names)}); rename the text column to 'text'"
        )
    return ds.select_columns([column])


def saved_dataset_corpus(path: Path) -> Corpus:
    """A ``datasets`` save_to_disk folder (read with ``datasets.load_from_disk``; memory-mapped arrow files)."""
    ds = _open_saved_dataset(path)
    column = ds.column_names[0]
    if not any(isinstance(t, str) and t.strip() for t in ds[:64][column]):
        raise CorpusError(f"corpus {str(path)!r} contains no text in its first rows; pass a corpus with documents")
    meta = [p for p in sorted(path.rglob("*")) if p.is_file() and (p.suffix == ".arrow" or p.name in DATASETS_METADATA)]
    ident = _short_hash(":".join(f"{p.relative_to(path)}={_file_identity(p)}" for p in meta))

    def documents(seed: int) -> Iterator[str]:
        for row in ds.shuffle(seed=seed):
            text = row[column]
            if isinstance(text, str) and text.strip():
                yield text

    name = path.name or str(path)
    return Corpus("files", f"dataset:{name}:{ident}", f"{slugify(name, 32)}-{ident[:6]}", str(path), True, documents)


def check_corpus(corpus: str | None) -> None:
    """Validate a corpus argument before anything expensive (model loading): a local file or folder must exist,
    have a known format and yield text; a hub dataset needs the hub. ``None`` and ``model`` need the model."""
    if corpus is None or str(corpus) == MODEL_CORPUS:
        return
    text = str(corpus)
    if not text.strip():
        raise CorpusError("empty corpus name; pass a .txt/.jsonl/.parquet file or folder, or a dataset name:config")
    from fastedit.data import KNOWN, dataset_path

    if text in KNOWN and not Path(text).exists():  # a data-set name: present in the data directory, or one line
        local_corpus(str(dataset_path(text)))
    elif _looks_like_path(text):
        local_corpus(text)
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?", text):
        hub_corpus(text)
    else:
        resolve_corpus(text, None, None)  # raises the cannot-interpret error


# ---- Hugging Face datasets -----------------------------------------------------------------------------------


def hub_corpus(spec: str, split: str = "train") -> Corpus:
    """``name`` or ``name:config`` of a Hugging Face dataset, streamed (the hub must be reachable)."""
    from fastedit.models import _hub_reachable

    name, _, config = spec.partition(":")
    if not _hub_reachable():
        raise CorpusError(
            f"corpus {spec!r} is a Hugging Face dataset and the hub is unreachable; pass a local .txt/.jsonl/.parquet "
            "file or folder, a data-set name (wikitext-2), or 'model' for text sampled from the model itself"
        )

    def documents(seed: int) -> Iterator[str]:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
        for record in ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER):
            text = _record_text(record, f"dataset {spec}")
            if text and text.strip():
                yield text

    return Corpus(
        "hub", f"hf:{name}:{config}:{split}", slugify(f"hf-{name}-{config}"), f"dataset {spec}", True, documents
    )


# ---- text sampled from the model (fastedit.stats.sampler) ------------------------------------------------------


def model_corpus(model: Any, tokenizer: Any, cfg: SamplerConfig | None = None) -> Corpus:
    """Token rows sampled from the model (`sampler.sampled_rows`, cached); ``documents`` decodes fresh rows."""
    cfg = cfg or SamplerConfig()

    def documents(seed: int) -> Iterator[str]:
        skip = len(special_prefix(tokenizer))
        start = 0
        while True:
            for row in sample_rows(model, tokenizer, range(start, start + cfg.batch_rows), seed, cfg, show=False):
                yield tokenizer.decode(row[skip:], skip_special_tokens=True)
            start += cfg.batch_rows

    def rows(seed: int, n_tokens: int, row_len: int, show: bool) -> list[torch.Tensor]:
        return sampled_rows(model, tokenizer, n_tokens, seed=seed, cfg=replace(cfg, row_tokens=row_len), show=show)

    return Corpus(
        "model",
        f"model-sampled:{cfg.settings()}",
        "model-sampled",
        "text sampled from the model",
        False,
        documents,
        rows=rows,
        row_tokens=cfg.row_tokens,
    )


# ---- resolution --------------------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or Path(text).expanduser().exists()
        or Path(text).suffix.lower() in KNOWN_SUFFIXES
        or "\\" in text
    )


def resolve_corpus(corpus: str | None, model: Any, tokenizer: Any) -> Corpus:
    """A local file/folder, a data-set name (``wikitext-2``, see `fastedit.data`), ``model``, or a HF dataset
    ``name:config`` (the only case that needs the hub). ``None``: the wikitext-2 data set when it is in the data
    directory, else text sampled from the model; the same online and offline, recorded in the cache metadata."""
    from fastedit.data import KNOWN, dataset_path, find_dataset

    if corpus is None:
        wikitext = find_dataset(DEFAULT_DATASET)
        if wikitext is not None:
            log.info("no corpus given: using the %s data set %s", DEFAULT_DATASET, wikitext)
            return local_corpus(str(wikitext))
        log.info(
            "no corpus given and no %s data set (`fastedit data add %s FILE`): sampling text from the model "
            "(seeded, cached, recorded in the statistics metadata)",
            DEFAULT_DATASET,
            DEFAULT_DATASET,
        )
        return model_corpus(model, tokenizer)
    if str(corpus) in KNOWN and not Path(str(corpus)).exists():
        return local_corpus(str(dataset_path(str(corpus))))
    corpus = str(corpus)
    if not corpus.strip():
        raise CorpusError("empty corpus name; pass a .txt/.jsonl/.parquet file or folder, or a dataset name:config")
    if corpus == MODEL_CORPUS:
        return model_corpus(model, tokenizer)
    if _looks_like_path(corpus):
        return local_corpus(corpus)
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?", corpus):
        return hub_corpus(corpus)
    raise CorpusError(
        f"cannot interpret corpus {corpus!r}: pass a local .txt/.jsonl/.parquet file or folder, a Hugging Face "
        "dataset as name or name:config, or 'model' for text sampled from the model"
    )
