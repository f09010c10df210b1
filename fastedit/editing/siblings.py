"""Entities of the same kind as a subject, as the model itself lists them ("Canada" → Norway, Mexico, ...).

An edit's neighbour loss on facts the model knows well sits at other subjects' keys: preserving the keys of the
neighbour prompts' subject tokens recovers most of it, and the positions after the subject hardly matter (README,
"Where the facts' NS goes"). The evaluation's neighbours are not known when editing, but subjects of the same kind
are: the model continues a few-shot list prompt ending in "<subject>," and the capitalised, comma-separated names
it writes on that line are the subject's siblings. No data set is read; each sample draws from its own seeded
generator, so a run is reproducible and the caller's random state is untouched.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from fastedit.arch import arch_for, model_device
from fastedit.arch.forward import cache_kwargs, last_logits_only
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
CHUNK = 64  # subjects per pass: a decoding step's matrix products run CHUNK × SAMPLES rows (Gemma 3, one thread:
# 0.55 s per subject at 16 subjects, 0.45 at 64)


def _listed(
    model: torch.nn.Module, tokenizer: Any, subjects: list[str], seed: int, across_ranks: bool
) -> dict[str, list[str]]:
    """subject -> the model's ``SAMPLES`` continuations of the list prompt ending in "<subject>,", sampled
    ``CHUNK`` subjects at a time (`sample_lists`)."""
    todo = [s for s in subjects if (id(model), seed, s) not in _CACHE]
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    with tqdm(total=len(todo), desc="siblings", unit="subject", leave=False) as bar:
        lists = share_tasks(
            [len(c) for c in chunks],
            lambda i: sample_lists(model, tokenizer, chunks[i], seed=seed),
            progress=lambda done: bar.update(done - bar.n),
            shared=across_ranks,
        )
    for chunk, texts in zip(chunks, lists, strict=True):
        for subject, continuations in zip(chunk, texts, strict=True):
            _CACHE[(id(model), seed, subject)] = continuations
    return {s: _CACHE[(id(model), seed, s)] for s in subjects}


@torch.no_grad()
def sample_lists(
    model: torch.nn.Module, tokenizer: Any, subjects: Sequence[str], *, seed: int = 0, top_k: int = TOP_K
) -> list[list[str]]:
    """For each subject, ``SAMPLES`` continuations of "LIST_PROMPT<subject>," (top-``top_k`` sampling, up to
    ``MAX_NEW_TOKENS`` tokens, each cut after its first line break or end of text), all subjects in one batch.

    The few-shot prompt is shared, so its keys/values are computed once and repeated for every row; each row then
    runs only its subject's tokens, left-padded *after* the shared prompt: row r = [prompt | pads | subject ,],
    the pads masked out and the positions counting the real tokens only, so every row computes what it would
    alone (when a sliding attention window is shorter than the rows, subjects of one length are batched instead).
    Row (subject, j) draws from its own generator seeded with ``seed`` + a checksum of (subject, j): the samples
    depend neither on the other subjects in the batch nor on the caller's random state."""
    if not subjects:
        return []
    device = model_device(model)
    shared = tokenizer(LIST_PROMPT).input_ids
    prompts = [tokenizer(f"{LIST_PROMPT}{s},").input_ids for s in subjects]
    # the prompt's own tokens, as far as every subject's prompt tokenises them alike ("\n" ends it, so normally all)
    p = next((i for i in range(len(shared)) if any(r[i] != shared[i] for r in prompts)), len(shared))
    p = min(p, *(len(r) - 1 for r in prompts))
    lengths = [len(r) - p for r in prompts]  # each subject's own tokens
    width = max(lengths)
    config = arch_for(model).text_config(model.config)
    window = getattr(config, "sliding_window", None)
    if window is not None and len(set(lengths)) > 1 and window < p + width + MAX_NEW_TOKENS:
        # a sliding window counts cache slots, pads included: sample subjects of one length together, unpadded
        by_subject: dict[str, list[str]] = {}
        for length in sorted(set(lengths)):
            group = [s for s, n in zip(subjects, lengths, strict=True) if n == length]
            by_subject.update(zip(group, sample_lists(model, tokenizer, group, seed=seed, top_k=top_k), strict=True))
        return [by_subject[s] for s in subjects]
    tails = [r[p:] for r in prompts for _ in range(SAMPLES)]  # row (subject i, sample j) = i * SAMPLES + j
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=device)  # (n, width)
    real = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
    mask = torch.cat([torch.ones(len(tails), p, dtype=real.dtype, device=device), real], 1)  # (n, p + width)
    positions = (mask.cumsum(1) - 1)[:, p:]

    cache = DynamicCache(config=config)
    with_cache = cache_kwargs(model, cache)  # the keyword's name is looked up once, not at every step
    last_only = last_logits_only(model)
    head = torch.tensor([prompts[0][:p]], device=device)
    model(input_ids=head, use_cache=True, **last_only, **with_cache)
    cache.batch_repeat_interleave(len(tails))

    generators = []
    for subject in subjects:
        for j in range(SAMPLES):
            generators.append(torch.Generator(device).manual_seed(seed + zlib.crc32(f"{subject}\0{j}".encode())))
    new: list[list[int]] = [[] for _ in tails]
    open_rows = set(range(len(tails)))
    for _ in range(MAX_NEW_TOKENS):
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **last_only,
            **with_cache,
        ).logits[:, -1]
        top, index = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)  # (n, k)
        probs = top.softmax(-1)
        picked = [int(index[r, torch.multinomial(probs[r], 1, generator=generators[r])]) for r in range(len(tails))]
        for r in list(open_rows):
            new[r].append(picked[r])
            if picked[r] == tokenizer.eos_token_id or "\n" in tokenizer.decode([picked[r]]):
                open_rows.discard(r)  # only the first line is read
        if not open_rows:
            break
        ids = torch.tensor(picked, device=device)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [texts[i * SAMPLES : (i + 1) * SAMPLES] for i in range(len(subjects))]
