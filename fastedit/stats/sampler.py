"""Generic text sampled from the model itself: fixed-length token rows for the key statistics, cached on disk.

Used when no corpus is given and no WikiText-2 copy is in the data directory (or with ``--corpus model``): it needs
no data and no network. Rows are ``row_tokens`` long: the tokenizer's special prefix (e.g. Gemma's <bos>), one
opener token (cycled over common sentence openers, as MEMIT's prefix templates start) and sampled tokens; every
position is a key position, so N keys cost N / row_tokens rows.

Speed (CPU): one KV-cached forward per new token for up to ``forward_rows`` rows at once, logits only at the last
position, and sampling that never sorts the vocabulary: top-k (a partial selection, O(V)) then top-p inside those k
(a sort of k values), temperature 1. Top-k/top-p rather than plain sampling because pure ancestral sampling from a
small model drifts into its long tail (rare sub-words, other scripts) and then stays there; the truncation keeps the
rows ordinary text, which is what C0 is meant to summarise. The LM head dominates a decode step (Gemma's 262k x 640
head is ~2/3 of it at 80 rows) and its cost per row falls as more rows share one read of its weight (measured on 2
cores: 4.7 ms/row at 80 rows, 3.0 at 160), so all the rows a call needs go through one forward up to
``forward_rows`` (logits ``forward_rows`` x vocab floats: 268 MB at 256 x 262k).

Reproducible and extendable: row r's randomness is a fixed table of uniforms (seeded by ``seed`` and r's block of
``batch_rows``), turned into a token by inverse-CDF sampling, so a row does not depend on which other rows share its
batch. The ids are cached under ``cache_dir()/samples`` keyed by model fingerprint, seed, row length and sampler
settings; a later run needing more rows generates only the missing ones.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fastedit.arch import model_device
from fastedit.arch.forward import last_logits_only
from fastedit.atomic import save_safetensors
from fastedit.progress import bar

log = logging.getLogger(__name__)

OPENERS = ("The", "In", "A", "It", "Therefore", "Because", "I", "You", "This", "When", "On", "He")
FORMAT = "fastedit-sampled-rows/1"


@dataclass(frozen=True)
class SamplerConfig:
    row_tokens: int = 128  # tokens per row, prefix and opener included (all of them are key positions)
    batch_rows: int = 128  # block size of the random table (rows r and r' share a table iff r // b == r' // b)
    forward_rows: int = 256  # rows generated in one forward: speed and memory only, not part of the samples' id
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0

    def settings(self) -> str:
        """The sampling settings (not the row length): the corpus id recorded in the statistics metadata."""
        return f"k{self.top_k}-p{self.top_p:g}-t{self.temperature:g}-b{self.batch_rows}"

    def tag(self) -> str:
        return f"len{self.row_tokens}-{self.settings()}"


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before any text (e.g. Gemma's <bos>; none for SmolLM2)."""
    with_special = tokenizer("a").input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return list(with_special[:start])
    return []


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the config and a strided sample (<= 4096 values) of every parameter: cheap, and different for
    another checkpoint of the same architecture (the samples depend on every weight)."""
    from fastedit.stats.cache import config_fingerprint

    digest = hashlib.sha256(config_fingerprint(model).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- sampling ------------------------------------------------------------------------------------------------


def _uniforms(rows: range, new_tokens: int, seed: int, block: int) -> torch.Tensor:
    """(len(rows), new_tokens) uniforms; row r's come from the table of its block r // block, seeded by seed."""
    out = torch.empty(len(rows), new_tokens, dtype=torch.float64)
    tables: dict[int, torch.Tensor] = {}
    for i, r in enumerate(rows):
        b = r // block
        if b not in tables:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
            tables[b] = torch.rand(block, new_tokens, generator=gen, dtype=torch.float64)
        out[i] = tables[b][r % block]
    return out


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """(B,) token ids from (B, V) logits: top-k, then top-p within the k, inverse CDF at the uniforms u (B,)."""
    # top-k before the temperature: same k tokens for any T > 0, and T divides k values, not a (B, V) copy (a
    # full-vocabulary division was a fifth of a Gemma decode step)
    vals, idx = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1)  # sorted
    probs = torch.softmax(vals.double() / cfg.temperature, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the better tokens
    probs = probs * (before < cfg.top_p)  # keeps the first token always
    cdf = probs.cumsum(-1)
    choice = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1).contiguous()).clamp_max(
        vals.shape[-1] - 1
    )
    return idx.gather(-1, choice).squeeze(-1)


def _opener_ids(tokenizer: Any) -> list[int]:
    """The first token of each opener (a single token, so every row's prompt has the same length)."""
    return [tokenizer(w, add_special_tokens=False).input_ids[0] for w in OPENERS]


@torch.no_grad()
def _generate(model: Any, prompts: torch.Tensor, u: torch.Tensor, banned: list[int], cfg: SamplerConfig, b: Any):
    """Continue (B, P) prompts by u.shape[1] tokens with the KV cache; returns (B, P + new) ids."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"use_cache": True, **last_logits_only(model)}
    cache_arg = "cache" if "cache" in params else "past_key_values"  # the newer transformers name first
    out = model(input_ids=prompts, **kwargs)
    tokens = [prompts]
    for t in range(u.shape[1]):
        logits = out.logits[:, -1, :]
        if banned:
            logits[:, banned] = float("-inf")  # no EOS/BOS/pad mid-row: every row stays plain text to its end
        nxt = pick_tokens(logits, u[:, t], cfg).unsqueeze(-1)
        tokens.append(nxt)
        b.update(len(nxt))
        if t + 1 < u.shape[1]:
            cache = getattr(out, "cache", None)
            out = model(input_ids=nxt, **{cache_arg: out.past_key_values if cache is None else cache}, **kwargs)
    return torch.cat(tokens, dim=1)


def sample_rows(
    model: Any, tokenizer: Any, rows: range, seed: int, cfg: SamplerConfig, show: bool = True
) -> torch.Tensor:
    """Rows ``rows`` (global indices) of the seeded sample, (len(rows), row_tokens) long, in batches."""
    device = model_device(model)
    prefix = special_prefix(tokenizer)
    openers = _opener_ids(tokenizer)
    new_tokens = cfg.row_tokens - len(prefix) - 1
    if new_tokens < 1:
        raise ValueError(f"row_tokens {cfg.row_tokens} leaves no room for sampled tokens")
    banned = sorted(set(getattr(tokenizer, "all_special_ids", []) or []) - set(openers))
    was_training = model.training
    model.eval()
    out = []
    try:
        with bar(total=len(rows) * new_tokens, desc="sampling text from the model", unit="tok", unit_scale=True,
                 show=show) as b:  # fmt: skip
            n_forwards = -(-len(rows) // cfg.forward_rows)
            size = -(-len(rows) // n_forwards)  # even shares: 160 rows run as one forward, 300 as 150 + 150
            for start in range(0, len(rows), size):
                part = rows[start : start + size]
                prompts = torch.tensor([[*prefix, openers[r % len(openers)]] for r in part], device=device)
                u = _uniforms(part, new_tokens, seed, cfg.batch_rows)
                out.append(_generate(model, prompts, u, banned, cfg, b).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---- the cache ------------------------------------------------------------------------------------------------


def samples_path(model: Any, seed: int, cfg: SamplerConfig, folder: Path | None = None) -> Path:
    from fastedit.models import cache_dir, model_name
    from fastedit.stats.cache import model_slug

    folder = folder if folder is not None else cache_dir() / "samples"
    return folder / f"{model_slug(model_name(model))}-{model_fingerprint(model)}-s{seed}-{cfg.tag()}.safetensors"


def _read(path: Path, cfg: SamplerConfig) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            ids = fh.get_tensor("ids")
    except Exception as exc:  # a corrupt or foreign file: regenerate rather than fail
        log.warning("ignoring unreadable sample cache %s (%s)", path, exc)
        return None
    if meta.get("format") != FORMAT or ids.ndim != 2 or ids.shape[1] != cfg.row_tokens:
        log.warning("ignoring sample cache %s: not a fastedit sample file of rows of %d", path, cfg.row_tokens)
        return None
    return ids.long()


def _write(path: Path, ids: torch.Tensor, meta: dict[str, str]) -> None:
    save_safetensors(path, {"ids": ids.to(torch.int32)}, meta)


def sampled_rows(
    model: Any,
    tokenizer: Any,
    n_tokens: int,
    *,
    seed: int = 0,
    cfg: SamplerConfig | None = None,
    folder: Path | None = None,
    show: bool = True,
) -> list[torch.Tensor]:
    """Rows holding exactly ``n_tokens`` positions (the last one cut), from the cache where possible."""
    cfg = cfg or SamplerConfig()
    n_rows = -(-n_tokens // cfg.row_tokens)
    path = samples_path(model, seed, cfg, folder)
    have = _read(path, cfg) if path.exists() else None
    n_have = 0 if have is None else len(have)
    if n_have >= n_rows:
        log.info("model-sampled rows: %d cached in %s", n_rows, path)
        ids = have[:n_rows]  # type: ignore[index]
    else:
        log.info("sampling %d rows of %d tokens from the model (%d cached)", n_rows - n_have, cfg.row_tokens, n_have)
        new = sample_rows(model, tokenizer, range(n_have, n_rows), seed, cfg, show)
        ids = new if have is None else torch.cat([have, new])
        meta = {"format": FORMAT, "seed": str(seed), **{k: str(v) for k, v in asdict(cfg).items()}}
        try:
            _write(path, ids, meta)
        except OSError as exc:  # a read-only cache only costs the reuse
            log.warning("could not cache the sampled rows in %s (%s)", path, exc)
    rows = list(ids)
    cut = n_tokens - (n_rows - 1) * cfg.row_tokens
    rows[-1] = rows[-1][:cut]
    return rows
