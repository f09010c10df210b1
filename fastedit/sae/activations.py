"""Activations for SAEs: text -> token windows -> hook captures -> a safetensors cache -> a shuffling buffer.

Capture goes through the registry (`arch_for(model).path("block"|"mlp", layer)`) and stops the forward right
after the hooked module, so no later layer and no logits are computed. BOS and padding positions are dropped:
their activations are outliers (Gemma's BOS residual is ~100x a normal token's) that would dominate training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fastedit.arch import arch_for, capture, model_device
from fastedit.atomic import save_safetensors
from fastedit.data import dataset_path
from fastedit.errors import FasteditError
from fastedit.models import cache_dir, model_name
from fastedit.progress import track
from fastedit.stats.corpus import Corpus, check_corpus, resolve_corpus
from fastedit.stats.errors import CorpusError

log = logging.getLogger(__name__)


HELD_OUT_EVERY = 10  # document i is held out when i % 10 == 9 (10%), whatever the read budget
CHARS_PER_TOKEN = 16  # read budget: generous (English BPE averages ~4 characters a token)


def corpus_source(corpus: str | Path | None, model: Any = None, tokenizer: Any = None) -> Corpus:
    """The corpus through the reader precompute uses (`fastedit.stats.corpus`); None: the wikitext-2 data set."""
    if corpus is None:
        corpus = dataset_path("wikitext-2")  # one line saying how to add it when it is missing
    return resolve_corpus(str(corpus), model, tokenizer)


def check_sae_corpus(corpus: str | Path | None) -> None:
    """Fail on a missing, unreadable or empty corpus before the model loads."""
    if corpus is None:
        corpus_source(None)
    else:
        check_corpus(str(corpus))


def read_corpus(
    corpus: str | Path | None = None,
    *,
    part: str = "train",
    tokens: int = 200_000,
    model: Any = None,
    tokenizer: Any = None,
) -> str:
    """Text of a corpus part, documents joined by newlines: "train" or "heldout" (every 10th document, in the
    reader's seed-0 order, so the two never overlap whatever is read). Reads about ``tokens`` tokens' worth.
    A corpus of fewer than 10 documents is cut by characters instead: the first 90% / the last 10%."""
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got {part!r}")
    src = corpus_source(corpus, model, tokenizer)
    budget = CHARS_PER_TOKEN * tokens
    chosen: list[str] = []
    seen: list[str] = []
    size = 0
    n = 0
    for n, doc in enumerate(src.documents(0), 1):
        if n <= HELD_OUT_EVERY:
            seen.append(doc)
        if ((n % HELD_OUT_EVERY == 0) == (part == "heldout")) and size < budget:
            chosen.append(doc)
            size += len(doc)
        if size >= budget and n >= HELD_OUT_EVERY:
            break
    if n < HELD_OUT_EVERY:  # too few documents to hold whole ones out
        text = "\n".join(seen)
        cut = int(len(text) * 0.9)
        cut = text.find("\n", cut) + 1 or cut  # split at a line boundary
        return text[:cut] if part == "train" else text[cut:]
    if not chosen:
        raise CorpusError(f"corpus {src.describe} has no {part} text")
    return "\n".join(chosen)


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer prepends one by default (Gemma does, SmolLM2 does not)."""
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and ids and ids[0] == bos else None


def token_windows(
    tokenizer: Any, texts: str | Sequence[str], context: int, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_windows, width) token ids and (n_windows,) lengths: windows start with BOS when the model uses one.

    A single string is one stream cut into windows; a list of strings gives one (padded) window per string.
    """
    bos = bos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body = context - (bos is not None)
    if isinstance(texts, str):
        ids: list[int] = []
        for para in texts.split("\n"):
            if para.strip():
                ids.extend(tokenizer(para, add_special_tokens=False)["input_ids"])
            if len(ids) >= max_tokens * 1.1:
                break
        n = min(len(ids), max_tokens) // body
        rows = [ids[i * body : (i + 1) * body] for i in range(n)]
    else:
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:body] for t in texts]
    if not rows:
        raise FasteditError(f"corpus too short: fewer than {body} tokens")
    width = max(len(r) for r in rows) + (bos is not None)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        row = ([bos] if bos is not None else []) + r
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths[i] = len(row)
    return out, lengths


def _mask(tokenizer: Any, windows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(n, ctx) bool: real, non-BOS tokens."""
    pos = torch.arange(windows.shape[1])
    keep = pos[None, :] < lengths[:, None]
    if bos_id(tokenizer) is not None:
        keep[:, 0] = False
    return keep


def hook_path(model: torch.nn.Module, layer: int, site: str) -> str:
    """The module whose output is the SAE's input: the block (residual after ``layer``) or the MLP."""
    from fastedit.sae.io import SITES

    if site not in SITES:
        raise FasteditError(f"unknown SAE site {site!r}; choose one of {', '.join(SITES)}")
    spec = arch_for(model)
    n = spec.n_layers(model.config)
    if not 0 <= layer < n:
        raise FasteditError(f"layer {layer} out of range: the model has layers 0..{n - 1}")
    return spec.path(SITES[site], layer)


@torch.no_grad()
def stream_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str],
    layer: int,
    *,
    site: str = "resid_post",
    context: int = 128,
    max_tokens: int = 100_000,
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield (n_tokens, d_in) float32 chunks of activations at the hook, BOS/padding dropped."""
    name = hook_path(model, layer, site)
    device = model_device(model)
    windows, lengths = token_windows(tokenizer, texts, context, max_tokens)
    keep = _mask(tokenizer, windows, lengths)
    for start in track(range(0, len(windows), batch_size), desc="activations", unit="batch", show=progress):
        ids = windows[start : start + batch_size]
        attn = (torch.arange(ids.shape[1])[None, :] < lengths[start : start + batch_size, None]).long()
        with capture(model, [name], stop_after=name) as rec:
            model(input_ids=ids.to(device), attention_mask=attn.to(device))
        # on the CPU in float32 whatever the model's device/dtype: the SAE trains and the cache lives there
        yield rec[name].output[keep[start : start + batch_size].to(device)].to("cpu", torch.float32)


def _cache_key(model: torch.nn.Module, corpus: str, layer: int, site: str, context: int, tokens: int) -> str:
    digest = hashlib.sha256(corpus.encode()).hexdigest()[:16]
    return hashlib.sha256(f"{model_name(model)}|{layer}|{site}|{context}|{tokens}|{digest}".encode()).hexdigest()[:20]


def cached_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    corpus: str,
    layer: int,
    *,
    site: str = "resid_post",
    context: int = 128,
    tokens: int = 100_000,
    folder: str | Path | None = None,
) -> Path:
    """Capture ``tokens`` activations once into a safetensors file (reused by every SAE variant); its path.

    Stored as float16 when every value fits (|x| < 60,000), else float32.
    """
    folder = Path(folder) if folder is not None else cache_dir() / "sae_activations"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"acts-{_cache_key(model, corpus, layer, site, context, tokens)}.safetensors"
    if path.exists():
        log.info("reusing cached activations %s", path)
        return path
    chunks = list(stream_activations(model, tokenizer, corpus, layer, site=site, context=context, max_tokens=tokens))
    acts = torch.cat(chunks)
    dtype = torch.float16 if acts.abs().max() < 60_000 else torch.float32
    save_safetensors(path, {"activations": acts.to(dtype)}, {"model": model_name(model)})
    log.info("cached %d activations at %s", len(acts), path)
    return path


def load_activations(path: str | Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("activations")


class ShufflingBuffer:
    """Mix activations from a stream of chunks: fill ``size`` rows, shuffle, hand out half, refill (SAELens-style).

    Consecutive tokens of one text are strongly correlated; batches drawn from a shuffled buffer of many texts
    are close to i.i.d., which SAE training needs. ``epochs`` > 1 replays a finite source.
    """

    def __init__(self, source: Any, *, size: int = 65_536, batch_size: int = 1024, seed: int = 0) -> None:
        self.source = source  # a callable returning a fresh iterator of (n, d) chunks
        self.size, self.batch_size = size, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def batches(self, epochs: int = 1) -> Iterator[torch.Tensor]:
        pool: list[torch.Tensor] = []
        held = 0
        buffer: torch.Tensor | None = None
        for _ in range(epochs):
            for chunk in self.source():
                pool.append(chunk)
                held += len(chunk)
                if held < self.size:
                    continue
                buffer = torch.cat(([buffer] if buffer is not None else []) + pool)
                pool, held = [], 0
                buffer = buffer[torch.randperm(len(buffer), generator=self.gen)]
                half = len(buffer) // 2
                yield from self._emit(buffer[:half])
                buffer = buffer[half:]
        rest = torch.cat(([buffer] if buffer is not None else []) + pool) if (pool or buffer is not None) else None
        if rest is not None and len(rest):
            yield from self._emit(rest[torch.randperm(len(rest), generator=self.gen)])

    def _emit(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        for i in range(0, len(rows) - self.batch_size + 1, self.batch_size):
            yield rows[i : i + self.batch_size].float()


def chunks_of(tensor: torch.Tensor, size: int = 4096) -> Iterator[torch.Tensor]:
    """A cached activation tensor as a stream of chunks (the buffer's source)."""
    for i in range(0, len(tensor), size):
        yield tensor[i : i + size]
