"""Data sets by name: one data directory, a small table of known sets, and fetch / add / list.

Data sets live as plain files in ``data_dir()`` (``$FASTEDIT_DATA``, default ``<fastedit cache>/data``), one file
per known name. ``fastedit data add NAME FILE`` *copies* a local file in (temp file + rename): a registered set
then survives the source folder moving or being unmounted, its sha256 is the file's own, and the files are small
(4 MB at most). ``fastedit data fetch NAME`` downloads it from its public source. Everything that takes a data
file (``fastedit edit``, ``--corpus``, ``--counterfact``) also takes a known name (`resolve_data`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastedit.atomic import write_with
from fastedit.errors import FasteditError

log = logging.getLogger(__name__)

DATA_ENV = "FASTEDIT_DATA"


class DataError(FasteditError):
    """A data set that is unknown, missing, unreadable or not in its expected layout."""


@dataclass(frozen=True)
class KnownDataset:
    """One data set fastedit knows by name."""

    name: str
    file: str  # file name inside the data directory
    layout: str  # "flat" | "original" | "zsre" (edit-request layouts) or "text"
    what: str
    source: str  # where `fetch` gets it
    licence: str
    sha256: str | None = None  # of the published file, where one fixed file exists


KNOWN: dict[str, KnownDataset] = {
    d.name: d
    for d in (
        KnownDataset(
            "counterfact",
            "counterfact-edit.json",
            "flat",
            "CounterFact edit cases, flat layout (prompt, subject, target_new, ground_truth, rephrase/locality)",
            "https://rome.baulab.info/data/dsets/counterfact.json, converted to the flat layout (first 10,000)",
            "MIT (Meng et al., ROME)",
            "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec",  # EasyEdit's 10k flat file
        ),
        KnownDataset(
            "counterfact-original",
            "counterfact.json",
            "original",
            "CounterFact in its original layout (requested_rewrite, paraphrase/neighbourhood/generation prompts)",
            "https://rome.baulab.info/data/dsets/counterfact.json",
            "MIT (Meng et al., ROME)",
        ),
        KnownDataset(
            "zsre",
            "zsre.json",
            "zsre",
            "zsRE question-answering edit cases (src, subject, alt, answers, rephrase, loc, loc_ans)",
            "https://rome.baulab.info/data/dsets/zsre_mend_eval.json",
            "MIT (De Cao et al., MEND/ROME release)",
        ),
        KnownDataset(
            "wikitext-2",
            "wiki.test.raw",
            "text",
            "WikiText-2 raw test split (plain text, ~240k words): default covariance / SAE / retain corpus",
            "Hugging Face dataset Salesforce/wikitext, config wikitext-2-raw-v1, split test",
            "CC BY-SA 3.0 (Merity et al.)",
            "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
        ),
    )
}


def data_dir() -> Path:
    """Where data sets live: $FASTEDIT_DATA, else <fastedit cache dir>/data."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    from fastedit.models import cache_dir

    return cache_dir() / "data"


def _known(name: str) -> KnownDataset:
    if name not in KNOWN:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def how_to_get(name: str) -> str:
    return f"run `fastedit data fetch {name}` or `fastedit data add {name} FILE`"


def dataset_path(name: str) -> Path:
    """The file of a known data set; a one-line `DataError` saying how to get it when it is missing."""
    path = data_dir() / _known(name).file
    if not path.is_file():
        raise DataError(f"data set {name!r} is not in {data_dir()}; {how_to_get(name)}")
    return path


def find_dataset(name: str) -> Path | None:
    """The file of a known data set, or None when it is missing."""
    path = data_dir() / _known(name).file
    return path if path.is_file() else None


def resolve_data(arg: str | Path) -> Path:
    """A data argument: an existing file as given, else a known data-set name, else the path as given (so the
    caller's own 'does not exist' error names it)."""
    path = Path(arg).expanduser()
    if path.exists() or str(arg) not in KNOWN:
        return path
    return dataset_path(str(arg))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- layout checks --------------------------------------------------------------------------------------------


def check_layout(name: str, path: Path) -> str:
    """Parse ``path`` as data set ``name`` expects; returns a short description ("10000 flat records")."""
    known = _known(name)
    if known.layout == "text":
        raw = path.read_bytes()
        if b"\0" in raw[: 1 << 20]:
            raise DataError(f"{path} is a binary file, not the plain text data set {name!r} needs")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}); data set {name!r} is plain text") from None
        if not text.strip():
            raise DataError(f"{path} is empty; data set {name!r} is plain text")
        return f"{len(text.split()):,} words of text"
    from fastedit.requests import load_requests

    try:
        parsed = load_requests(path, skip_invalid=True)
    except FasteditError as exc:
        raise DataError(f"{path} does not parse as data set {name!r}: {exc}") from None
    if parsed.layout != known.layout:
        raise DataError(f"{path} holds {parsed.layout}-layout records; data set {name!r} is the {known.layout} layout")
    return f"{len(parsed.requests):,} {parsed.layout} records"


# ---- add / fetch / list ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetStatus:
    name: str
    path: Path
    present: bool
    size: int | None = None
    sha256: str | None = None
    matches_published: bool | None = None  # None when no fixed published file is known


def _install(name: str, write: Callable[[Path], None], check: bool = True) -> DatasetStatus:
    """Write the data set into a temp file in the data directory, check its layout (unless the source was checked
    already), then rename it into place."""
    known = _known(name)

    def write_checked(tmp: Path) -> None:
        write(tmp)
        if check:
            log.info("data set %s: %s", name, check_layout(name, tmp))

    write_with(data_dir() / known.file, write_checked)
    return status(name)


def add_dataset(name: str, source: str | Path) -> DatasetStatus:
    """Copy a local file into the data directory as data set ``name`` (checked for its layout first)."""
    import shutil

    _known(name)
    src = Path(source).expanduser()
    if not src.is_file():
        raise DataError(f"cannot add data set {name!r}: {str(src)!r} is not a file")
    log.info("data set %s: %s", name, check_layout(name, src))  # before copying anything
    result = _install(name, lambda tmp: shutil.copyfile(src, tmp), check=False)
    if result.matches_published is False:
        log.warning("data set %s: %s differs from the published file (sha256 %s)", name, src, KNOWN[name].sha256)
    return result


def status(name: str) -> DatasetStatus:
    known = _known(name)
    path = data_dir() / known.file
    if not path.is_file():
        return DatasetStatus(name, path, False)
    digest = sha256_of(path)
    matches = None if known.sha256 is None else digest == known.sha256
    return DatasetStatus(name, path, True, path.stat().st_size, digest, matches)


def list_datasets() -> list[DatasetStatus]:
    return [status(name) for name in KNOWN]


def _download(url: str, dest: Path) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response, dest.open("wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"cannot download {url} ({exc})") from None


def _flat_from_original(record: dict) -> dict:
    """One original CounterFact record in the flat layout (first paraphrase, first neighbourhood prompt)."""
    rw = record["requested_rewrite"]
    return {
        "case_id": record["case_id"],
        "prompt": rw["prompt"].replace("{}", rw["subject"]),
        "subject": rw["subject"],
        "target_new": rw["target_new"]["str"],
        "ground_truth": rw["target_true"]["str"],
        "rephrase_prompt": record["paraphrase_prompts"][0],
        "locality_prompt": record["neighborhood_prompts"][0],
        "locality_ground_truth": rw["target_true"]["str"],
    }


def _fetch_writer(name: str) -> Callable[[Path], None]:
    counterfact_url = "https://rome.baulab.info/data/dsets/counterfact.json"
    if name == "counterfact-original":
        return lambda tmp: _download(counterfact_url, tmp)
    if name == "counterfact":

        def write(tmp: Path) -> None:
            _download(counterfact_url, tmp)
            records = json.loads(tmp.read_text())
            tmp.write_text(json.dumps([_flat_from_original(r) for r in records[:10_000]], indent=1))

        return write
    if name == "zsre":
        return lambda tmp: _download("https://rome.baulab.info/data/dsets/zsre_mend_eval.json", tmp)

    def wikitext(tmp: Path) -> None:
        import datasets

        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
        tmp.write_text("".join(ds["text"]), encoding="utf-8")

    return wikitext


def fetch_dataset(name: str) -> DatasetStatus:
    """Download data set ``name`` from its public source into the data directory (network needed)."""
    from fastedit.models import _hub_reachable

    known = _known(name)
    host = "huggingface.co" if "Hugging Face" in known.source else known.source.split("/")[2]
    reachable = _hub_reachable() if host == "huggingface.co" else _host_reachable(host)
    if not reachable:
        raise DataError(
            f"cannot fetch data set {name!r}: {host} is unreachable; on a machine without network, copy the file "
            f"({known.source}) here and run `fastedit data add {name} FILE`"
        )
    if host == "huggingface.co":
        os.environ["HF_HUB_OFFLINE"] = "0"
    return _install(name, _fetch_writer(name))


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def describe(statuses: list[DatasetStatus], header: bool = True) -> str:
    """The `fastedit data list` table: every known name, present or missing."""
    lines = [f"data directory: {data_dir()}"] if header else []
    for s in statuses:
        if s.present:
            assert s.size is not None and s.sha256 is not None
            note = {True: "  (published file)", False: "  (differs from the published file)", None: ""}
            lines.append(f"{s.name:22} {s.size / 1e6:7.2f} MB  sha256 {s.sha256}{note[s.matches_published]}")
        else:
            lines.append(f"{s.name:22} missing     {how_to_get(s.name)}")
    return "\n".join(lines)


def default_wikitext() -> Path | None:
    """The WikiText-2 test file of the data directory, or None when it was never added."""
    return find_dataset("wikitext-2")
