"""Entities of the same kind as a subject, as the model itself lists them ("Canada" → Norway, Mexico, ...).

An edit's neighbour loss on facts the model knows well sits at other subjects' keys: preserving the keys of the
neighbour prompts' subject tokens recovers most of it, and the positions after the subject hardly matter (README,
"Where the facts' NS goes"). The evaluation's neighbours are not known when editing, but subjects of the same kind
are: the model continues a few-shot list prompt ending in "<subject>," and the capitalised, comma-separated names
it writes on that line are the subject's siblings. No data set is read; sampling is seeded inside a forked RNG,
per subject, so a run is reproducible, and the caller's random state is untouched.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastedit.arch import model_device
from fastedit.stats.distributed import share_tasks

# Lists of one kind each, so the model continues "<subject>," with more of the subject's kind.
LIST_PROMPT = (
    "Similar things, listed:\n"
    "Apple, Microsoft, Google, Amazon, Intel\n"
    "Paris, London, Berlin, Madrid, Rome\n"
    "Mozart, Beethoven, Bach, Chopin, Haydn\n"
)
SAMPLES = 4  # continuations per subject (top-k sampled): one greedy line often lists one or two names
MAX_NEW_TOKENS = 16
TOP_K = 20
MAX_WORDS = 4  # longer "names" are sentences, not entities
_SPLIT = re.compile(r",|;|\(|\)|\band\b|\. ")
_TAG = re.compile(r"<[^<>]*>")


def parse_siblings(text: str, exclude: set[str]) -> list[str]:
    """The names in the first line of a continuation: comma, "and" or sentence separated, capitalised, at most
    ``MAX_WORDS`` words, a leading "the" dropped, none in ``exclude``, each once."""
    names: list[str] = []
    line = _TAG.sub(" ", text).split("\n")[0]  # tags such as <start_of_image> are not names
    for part in _SPLIT.split(line):
        name = part.strip().strip(".…'\"").strip()
        name = name[4:].strip() if name.lower().startswith("the ") else name
        usable = name and name[0].isupper() and len(name.split()) <= MAX_WORDS
        if usable and name not in exclude and name not in names:
            names.append(name)
    return names


@torch.no_grad()
def list_siblings(
    model: torch.nn.Module,
    tokenizer: Any,
    subjects: Sequence[str],
    *,
    per_subject: int,
    seed: int = 0,
    across_ranks: bool = False,
) -> dict[str, list[str]]:
    """subject -> up to ``per_subject`` sibling names (first seen first), none of them a subject in ``subjects``;
    [] when the model lists nothing usable. Each subject's continuations are sampled once per
    (model object, seed) and kept (as `context_templates` are), so a subject keeps the list it got when first
    asked, also after later edits of the model.
    ``across_ranks``: inside a process group the ranks share the subjects and every rank receives all lists (every
    rank must call it)."""
    unique = list(dict.fromkeys(subjects))
    banned = set(unique)
    listed = _listed(model, tokenizer, unique, seed, across_ranks)
    out: dict[str, list[str]] = {}
    for subject in unique:
        names: list[str] = []
        for text in listed[subject]:
            found = parse_siblings(text, banned)
            # a part of the subject's own name ("Jobs" for "Steve Jobs") is the subject, not a sibling
            names += [n for n in found if n not in names and n not in subject and subject not in n]
        out[subject] = names[:per_subject]
    return out


_CACHE: dict[tuple[int, int, str], list[str]] = {}


def _listed(
    model: torch.nn.Module, tokenizer: Any, subjects: list[str], seed: int, across_ranks: bool
) -> dict[str, list[str]]:
    """subject -> the model's ``SAMPLES`` continuations of the list prompt ending in "<subject>,". Each subject is
    sampled under its own seed (``seed`` + a checksum of the subject), so its siblings do not depend on which
    other subjects are asked for, or when, or on which rank."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    todo = [s for s in subjects if (id(model), seed, s) not in _CACHE]

    def sample(i: int) -> list[str]:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed + zlib.crc32(todo[i].encode()))
            ids = tokenizer(f"{LIST_PROMPT}{todo[i]},", return_tensors="pt").input_ids.to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=True,
                top_k=TOP_K,
                num_return_sequences=SAMPLES,
                pad_token_id=pad,
            )
        return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    with tqdm(total=len(todo), desc="siblings", unit="subject", leave=False) as bar:
        lists = share_tasks(
            [1] * len(todo), sample, progress=lambda done: bar.update(done - bar.n), shared=across_ranks
        )
    for subject, texts in zip(todo, lists, strict=True):
        _CACHE[(id(model), seed, subject)] = texts
    return {s: _CACHE[(id(model), seed, s)] for s in subjects}
