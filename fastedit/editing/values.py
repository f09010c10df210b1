"""v* / z* optimisation: the vector each request wants at the edit site, found by gradient descent on δ.

δ_r (d_model) is added at the subject's last token of every prompt of request r, at a *site*: the residual
after the last edited layer (MEMIT, EMMET, AlphaEdit) or the output of the edited ``mlp_out`` (ROME), see
``edit_site``. Post-MLP-norm families (Gemma 2/3) by default get one δ per edited layer, on each layer's
``mlp_out`` output, optimised jointly (``post_norm="per_layer"``; ``postnorm.py`` holds the residual mapping).
Per request, minimised over δ (shapes: h, δ (d_model,)):

    loss = mean_prompts NLL(" " + target_new | context prefix + prompt)        (teacher forced, mean per token)
         + kl_factor · KL( p_now(· | "{subject} is a") ‖ p_before )           (at the subject's last token)
         + v_weight_decay · ‖δ‖ / ‖h‖²
    after each Adam step: ‖δ‖ ≤ clamp_norm_factor · ‖h‖;   result z = h + δ

Modes (``hparams.v_mode``): "reference" runs the whole model per step for one request at a time (the plain
loop the reference tools run). "fast" replays only the layers from the site's layer upwards from a stored
input and only the token columns from the subject's last token on (the earlier ones sit in a key/value cache;
``replay.py``) and reads logits only where the loss needs them. Every mode stops a request by the same rules
(loss below ``v_loss_threshold``, target NLL below ``v_nll_stop``, or a stalled NLL), so the modes differ in speed,
not in the targets an hparams file asks for.
"batched" (the default) is "fast" over all requests of a chunk together, each with its own δ (one
forward/backward per step): Adam is per coordinate, so the targets equal "fast"'s; with the prefix cached a step's
matrices have ~20 rows per request and cost about what reading the weights costs, which the chunk shares
(1.2-1.4× faster than "fast" per request on one CPU thread, SmolLM2 and Gemma 3, 16 requests). A chunk's
converged requests leave its forward (``NARROW_BELOW``), so a chunk costs less as its requests converge, and
requests of similar row width share a chunk (``chunks_by_width``), so little of a step is spent on padding.

``compute_values(..., across_ranks=True)`` shares the chunks among the ranks of a process group (torchrun, or
``fastedit edit --workers N``), each rank taking the next chunk when it is free, and gathers every target on every
rank.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fastedit.arch import ArchSpec, add_at_positions, capture, model_device
from fastedit.config import config_to_dict
from fastedit.editing.batching import anchor_pad, inverse_order, pad_token_id, right_pad
from fastedit.editing.hparams import EditHparams, is_v_star_setting
from fastedit.editing.keys import contextual_prompts
from fastedit.editing.replay import LayerReplay
from fastedit.editing.subject import subject_last_index
from fastedit.errors import FasteditError
from fastedit.requests import EditRequest
from fastedit.stats.distributed import rank_and_world, share_tasks

log = logging.getLogger(__name__)

BATCH_CHUNK = 16  # requests optimised together in "batched" mode (bounds the logits memory on large vocabs)
# A step's rows are narrowed to the unconverged requests once those are fewer than this share of the requests
# whose rows it runs (0 keeps every row to the end). Narrowing slices the recorded forward (milliseconds against a
# step's ~second), so it happens as soon as one request converges.
NARROW_BELOW = 1.0


class NonFiniteLossError(FasteditError):
    """The v* loss became NaN/inf for a request."""


def edit_site(spec: ArchSpec, hp: EditHparams) -> str | tuple[str, ...]:
    """Where δ goes: the residual after the last edited layer (block output), or that layer's ``mlp_out``
    output for ROME (the rank-one solve targets the matrix's own output). Post-MLP-norm families follow
    ``hp.post_norm``: "per_layer" gives one δ per edited layer on its ``mlp_out`` output (a tuple of sites,
    before each norm), "output_site" one δ on the last layer's ``mlp_out`` output (a baseline of the norm study)."""
    layer = hp.layers[-1]
    if spec.post_mlp_norm is not None and hp.method != "rome":
        if hp.post_norm == "per_layer":
            return tuple(spec.path("mlp_out", i) for i in hp.layers)
        if hp.post_norm == "output_site":
            return spec.path("mlp_out", layer)
    if hp.method == "rome":
        return spec.path("mlp_out", layer)
    return spec.path("block", layer)


def site_start_layer(spec: ArchSpec, hp: EditHparams) -> int:
    """The lowest block holding a site of ``edit_site(spec, hp)``: where the fast modes start replaying."""
    return hp.layers[0] if isinstance(edit_site(spec, hp), tuple) else hp.layers[-1]


def values_key(spec: ArchSpec, hp: EditHparams) -> str:
    """What v* depends on: the site(s) and the v*/KL/context settings, not λ, ridge, μ or the closed form.

    Equal keys mean `compute_values` would return the same targets, so MEMIT, EMMET or a λ grid can share them.
    """
    relevant = {k: v for k, v in config_to_dict(hp).items() if is_v_star_setting(k)}
    relevant.update(clamp_norm_factor=hp.clamp_norm_factor, site=edit_site(spec, hp), rome=hp.method == "rome")
    return json.dumps(relevant, sort_keys=True, default=str)


@dataclass
class _Rows:
    """Every prompt row of a group of requests, and where the loss reads logits."""

    ids: list[list[int]] = field(default_factory=list)
    sub_pos: list[int] = field(default_factory=list)  # (n,) subject's last token: where δ is added
    owner: list[int] = field(default_factory=list)  # (n,) request index of each row
    read_row: list[int] = field(default_factory=list)  # (m,) target-token reads
    read_pos: list[int] = field(default_factory=list)
    read_label: list[int] = field(default_factory=list)
    read_weight: list[float] = field(default_factory=list)  # 1 / (n_tokens · n_prompts of the request)
    read_owner: list[int] = field(default_factory=list)
    kl_row: list[int] = field(default_factory=list)  # (B,) one KL prompt per request
    bare_row: list[int] = field(default_factory=list)  # (B,) the bare rewriting prompt: where h is read


def _build_rows(tokenizer: Any, requests: Sequence[EditRequest], contexts: Sequence[str], kl_prompt: str) -> _Rows:
    rows = _Rows()
    for r, req in enumerate(requests):
        target = tokenizer(" " + req.target_new, add_special_tokens=False).input_ids
        if not req.target_new.strip() or not target:
            raise FasteditError(f"case {req.case_id}: target_new {req.target_new!r} is empty; give a new target")
        templates = contextual_prompts(req, contexts)
        for c, template in enumerate(templates):
            prompt = tokenizer(template.replace("{}", req.subject, 1)).input_ids
            row = len(rows.ids)
            if c == 0:
                rows.bare_row.append(row)
            rows.ids.append(prompt + target[:-1])
            rows.sub_pos.append(subject_last_index(tokenizer, template, req.subject, req.case_id))
            rows.owner.append(r)
            for j, token in enumerate(target):
                rows.read_row.append(row)
                rows.read_pos.append(len(prompt) - 1 + j)
                rows.read_label.append(token)
                rows.read_weight.append(1.0 / (len(target) * len(templates)))
                rows.read_owner.append(r)
        rows.kl_row.append(len(rows.ids))
        rows.ids.append(tokenizer(kl_prompt.replace("{}", req.subject, 1)).input_ids)
        rows.sub_pos.append(subject_last_index(tokenizer, kl_prompt, req.subject, req.case_id))
        rows.owner.append(r)
    return rows


def chunks_by_width(
    tokenizer: Any, requests: Sequence[EditRequest], contexts: Sequence[str], kl_prompt: str
) -> list[list[int]]:
    """Request indices in chunks of ``BATCH_CHUNK`` for "batched" mode, requests of similar row width together.

    A chunk's rows are padded to its widest suffix (the columns from the subject's last token on, which every
    step runs), so a chunk in file order spends ~40 % of its columns on padding on CounterFact; sorted by width
    ~15 %. Requests do not interact in a chunk (each has its own rows, δ and loss), so the grouping changes the
    cost, not the targets (up to float rounding)."""

    def width(req: EditRequest) -> int:
        rows = _build_rows(tokenizer, [req], contexts, kl_prompt)
        return max(len(ids) - pos for ids, pos in zip(rows.ids, rows.sub_pos, strict=True))

    order = sorted(range(len(requests)), key=lambda i: width(requests[i]))  # stable: ties keep file order
    return [order[i : i + BATCH_CHUNK] for i in range(0, len(order), BATCH_CHUNK)]


@dataclass
class ValueResult:
    """Per request: h (the site's value at the bare prompt before any δ) and the target z, both (B, d_model)
    for one site, (B, S, d_model) for a tuple of S sites. With one site z = h + δ. With several, z_i is site i's
    value in the final optimised forward (every δ applied): m_i(δ_<i) + δ_i, the shift that δ_<i causes upstream
    included, which is what that forward's loss was measured at.

    ``key`` (`values_key`) and ``contexts`` say what the targets were made with, so they can be reused safely."""

    init: torch.Tensor
    targets: torch.Tensor
    info: list[dict[str, Any]]
    contexts: list[str] = field(default_factory=list)
    key: str = ""
    delta: torch.Tensor | None = None  # δ, shaped like init

    def to(self, device: torch.device | str) -> ValueResult:
        """The same result with its tensors on ``device`` (in place; returns self)."""
        self.init, self.targets = self.init.to(device), self.targets.to(device)
        self.delta = None if self.delta is None else self.delta.to(device)
        return self

    def reordered(self, order: Sequence[int]) -> ValueResult:
        """Back to request order when request ``order[j]`` is row j here (a permutation of range(B))."""
        where = inverse_order(order)
        pick = lambda t: None if t is None else t[where.to(t.device)]  # noqa: E731
        info = [self.info[j] for j in where.tolist()]
        return ValueResult(pick(self.init), pick(self.targets), info, list(self.contexts), self.key, pick(self.delta))


def compute_values(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    *,
    site: str | Sequence[str],
    layer: int,
    contexts: Sequence[str],
    hp: EditHparams,
    across_ranks: bool = False,
) -> ValueResult:
    """Optimise δ for every request at ``site`` with the mode ``hp.v_mode``.

    ``layer``: the lowest block that holds a site (the fast modes replay from it). ``site`` may be a tuple of
    sites: each request then gets one δ per site, optimised jointly (``post_norm="per_layer"``).
    ``across_ranks``: inside a process group (torchrun or ``fastedit edit --workers``) the ranks share the chunks
    of requests, each taking the next one when it is free, with its own threads (requests are independent given
    the model), and every rank receives all targets in request order; with one rank it changes nothing.
    """
    rank, world = rank_and_world() if across_ranks else (0, 1)
    sites = [site] if isinstance(site, str) else list(site)
    if hp.v_mode == "batched":
        groups = chunks_by_width(tokenizer, requests, contexts, hp.kl_prompt)[::-1]  # widest (costliest) first
    else:
        groups = [[i] for i in range(len(requests))]
    fast = hp.v_mode != "reference"
    where = sites[0] if len(sites) == 1 else f"{len(sites)} sites"
    if world > 1:
        log.info(
            "v*: %d chunks of %d requests, shared among %d ranks as they free up", len(groups), len(requests), world
        )

    def optimise(g: int) -> ValueResult:
        chunk = [requests[i] for i in groups[g]]
        part = _optimise(model, tokenizer, spec, chunk, sites, layer, contexts, hp, fast=fast)
        if world > 1:
            part = part.to("cpu")
            for item in part.info:
                item["rank"] = rank
        return part

    with tqdm(total=len(requests), desc=f"v* ({hp.v_mode}) at {where}", unit="req", leave=False) as bar:
        sizes = [len(g) for g in groups]
        parts = share_tasks(sizes, optimise, progress=lambda done: bar.update(done - bar.n), shared=world > 1)
    result = concat_values(parts).reordered([i for g in groups for i in g]).to(model_device(model))
    if isinstance(site, str):
        result.init, result.targets, result.delta = result.init[:, 0], result.targets[:, 0], result.delta[:, 0]
    return result


def concat_values(parts: Sequence[ValueResult]) -> ValueResult:
    """The parts' requests one after the other (tensors concatenated along the request axis)."""
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    info = [item for p in parts for item in p.info]
    return ValueResult(init=cat("init"), targets=cat("targets"), info=info, delta=cat("delta"))


class _Reads:
    """The forward a v* step runs: δ_owner added at every row's subject token at each site, logits read only at
    the target tokens (m reads) and at each request's KL prompt (B reads)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        spec: ArchSpec,
        rows: _Rows,
        sites: Sequence[str],
        layer: int,
        fast: bool,
    ) -> None:
        self.model, self.sites = model, list(sites)
        device = model_device(model)
        self.replay = LayerReplay(model, spec, layer) if fast else None
        self._index(rows)
        # One no-grad forward: h at each site (bare prompts), and (fast modes) the input of the layers to replay.
        with capture(model, self.sites) as rec:
            if self.replay is not None:
                # Rows aligned at the subject's last token: the tokens before it never see δ (causal attention),
                # so they are run once into the key/value cache; every step runs columns from the subject token
                # on, where the subject token is column 0 and a read at token index p is column p - sub_pos[row].
                batch = anchor_pad(rows.ids, rows.sub_pos, pad_token_id(tokenizer), device)
                self.replay.record(batch.ids, batch.mask, position_ids=batch.position_ids, prefix_len=batch.prefix_len)
            else:
                self.ids, self.mask = right_pad(rows.ids, pad_token_id(tokenizer), device)
                with torch.no_grad():
                    model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        self.h = self.at_bare(rec)  # (B, S, d)
        self.layer = layer

    def _index(self, rows: _Rows) -> None:
        """Where each row's δ goes and where the loss reads logits, for ``rows``: (row, column) of the m target
        reads then the B KL reads. Replayed rows are aligned at the subject's last token, which is their column 0,
        so a read at token index p is column p − sub_pos[row]; full rows are read at p."""
        t = lambda values: torch.as_tensor(values, device=model_device(self.model))  # noqa: E731
        self.owner, self.bare, sub_pos = t(rows.owner), t(rows.bare_row), t(rows.sub_pos)
        self.rows = torch.cat([t(rows.read_row), t(rows.kl_row)])
        self.pos = torch.cat([t(rows.read_pos), sub_pos[t(rows.kl_row)]])  # token indices in each row
        if self.replay is not None:
            self.pos, sub_pos = self.pos - sub_pos[self.rows], torch.zeros_like(sub_pos)
        self.sub_pos = sub_pos

    def select(self, requests: torch.Tensor, rows: _Rows) -> _Reads:
        """The replayed reads of ``requests`` (ascending indices into this one's requests) alone, ``rows`` being
        their `_build_rows`: the recorded forward is sliced to their rows instead of run again (a recording costs
        more than a step). The rows keep this one's padded width. For ``logits`` only: h and the KL reference
        stay with the caller (`_DeltaSearch`), as do the full reads for ``site_values``."""
        assert self.replay is not None, "only replayed (batched) reads are narrowed"
        keep = torch.isin(self.owner, requests).nonzero().squeeze(1)  # their rows, in row order
        new = copy.copy(self)
        new.replay = self.replay.select_rows(keep)
        new._index(rows)
        return new

    def at_bare(self, rec: dict[str, Any]) -> torch.Tensor:
        """Each site's captured output at the bare prompts' subject token: (B, S, d), float32."""
        rows, pos = self.bare, self.sub_pos[self.bare]
        return torch.stack([rec[name].output[rows, pos].float() for name in self.sites], dim=1)

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """Logits (m + B, vocab) at the target reads then the KL reads; delta (B, S, d)."""
        with contextlib.ExitStack() as stack:
            for j, name in enumerate(self.sites):
                stack.enter_context(add_at_positions(self.model, name, delta[self.owner, j], self.sub_pos))
            if self.replay is not None:
                return self.replay.logits_at(self.rows, self.pos).float()
            out = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
            return out.logits[self.rows, self.pos].float()

    @torch.no_grad()
    def site_values(self, delta: torch.Tensor) -> torch.Tensor:
        """(B, S, d): each site's value in the forward with every δ applied, m_i(δ_<i) + δ_i. The capture
        hooks are registered before the δ hooks, so they record m_i(δ_<i); δ_i is added here."""
        with capture(self.model, self.sites) as rec:
            self.logits(delta)
        return self.at_bare(rec) + delta

    def checked_logits(self, delta: torch.Tensor) -> torch.Tensor:
        """`logits`, raising a clear error when a site's module did not run in it (it lies below the replayed
        layers, so a δ there would change nothing)."""
        fired = dict.fromkeys(self.sites, 0)
        counters = [
            self.model.get_submodule(name).register_forward_hook(lambda *_, name=name: fired.__setitem__(name, 1))
            for name in self.sites
        ]
        try:
            logits = self.logits(delta)
        finally:
            for handle in counters:
                handle.remove()
        if not all(fired.values()):
            missing = [name for name, n in fired.items() if not n]
            raise ValueError(
                f"v* sites {missing} lie below the replay start layer {self.layer}; pass the lowest site layer"
            )
        return logits


class _Stopping:
    """When a request is done: total loss below ``v_loss_threshold`` (the reference tools' rule), target NLL below
    ``v_nll_stop``, or an NLL that improved by < 1 % over ``v_nll_patience`` steps. The same in every mode, so
    ``v_mode`` changes how fast the targets are found, not which targets an hparams file asks for."""

    def __init__(self, hp: EditHparams) -> None:
        self.hp = hp
        self.history: list[torch.Tensor] = []

    def done(self, loss: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        self.history.append(nll)
        done = (loss < self.hp.v_loss_threshold) | (nll < self.hp.v_nll_stop)
        k = self.hp.v_nll_patience
        if len(self.history) > k:
            done |= nll > 0.99 * self.history[-1 - k]
        return done


def _losses(
    logits: torch.Tensor,
    rows: _Rows,
    kl_before: torch.Tensor,
    delta: torch.Tensor,
    h_norm: torch.Tensor,
    hp: EditHparams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), target NLL (B,)) of every request: NLL + kl_factor·KL(now ‖ before) + wd·Σ_sites ‖δ‖/‖h‖²."""
    device = logits.device
    labels = torch.as_tensor(rows.read_label, device=device)
    weights = torch.as_tensor(rows.read_weight, device=device, dtype=logits.dtype)
    owner = torch.as_tensor(rows.read_owner, device=device)
    nll, kl = _NllAndKl.apply(logits, labels, weights, owner, kl_before)
    decay = hp.v_weight_decay * (delta.norm(dim=2) / h_norm**2).sum(dim=1)
    return nll + hp.kl_factor * kl + decay, nll


class _NllAndKl(torch.autograd.Function):
    """(NLL (B,), KL (B,)) from logits (m + B, V): m target reads, then one KL read per request.

    NLL_b = −Σ_{j: owner_j = b} w_j · log p_j(label_j);  KL_b = Σ_v q_bv (log q_bv − log p_before,bv).
    Written out because autograd's version makes several full (m + B, V) temporaries per step (log-softmax, the
    zero-filled gradients of the slices and of the gather), which on a 262k vocabulary cost ~40 % as much as the
    LM head itself. Gradients, with p = softmax(logits):
      ∂NLL_b/∂logits_j = g_b·w_j·(p_j − onehot(label_j))
      ∂KL_b/∂logits_b = g_b·q_b ⊙ (log q_b − log p_before,b − KL_b)
    """

    @staticmethod
    def forward(ctx, logits, labels, weights, owner, kl_before):  # type: ignore[override]
        m = len(labels)
        lse = torch.logsumexp(logits, -1)  # (m + B,)
        token_lp = logits[:m].gather(1, labels[:, None]).squeeze(1) - lse[:m]  # (m,)
        n_req = kl_before.shape[0]
        nll = torch.zeros(n_req, device=logits.device, dtype=logits.dtype).index_add(0, owner, -token_lp * weights)
        log_q = logits[m:] - lse[m:, None]  # (B, V)
        kl = (log_q.exp() * (log_q - kl_before)).sum(-1)
        ctx.save_for_backward(logits, lse, labels, weights, owner, kl_before, kl)
        return nll, kl

    @staticmethod
    def backward(ctx, g_nll, g_kl):  # type: ignore[override]
        logits, lse, labels, weights, owner, kl_before, kl = ctx.saved_tensors
        m = len(labels)
        grad = (logits - lse[:, None]).exp_()  # p, then each block scaled in place (m + B, V)
        scale = g_nll[owner] * weights  # (m,)
        grad[:m].mul_(scale[:, None]).scatter_add_(1, labels[:, None], -scale[:, None])
        shift = logits[m:] - lse[m:, None] - kl_before - kl[:, None]  # log q − log p_before − KL (B, V)
        grad[m:].mul_(shift.mul_(g_kl[:, None]))
        return grad, None, None, None, None


class _DeltaSearch:
    """Adam on δ = u · scale for B requests at S sites (u, δ: (B, S, d)), one step at a time.

    ``measure`` runs the forward of the requests in ``live`` (those whose rows the current reads hold) and returns
    their (loss, NLL); ``step`` moves the active requests' δ and clamps ‖δ‖ ≤ clamp_norm_factor · ‖h‖ per site;
    ``keep_rows_of`` narrows the reads to the active requests once some have converged (``NARROW_BELOW``).
    A request's gradient comes from its own rows only and a converged one's is zero either way, so dropping its
    rows leaves Adam's inputs unchanged (up to float noise)."""

    def __init__(self, rows_of: Callable[[Sequence[int]], _Rows], reads: _Reads, rows: _Rows, hp: EditHparams) -> None:
        self.rows_of, self.hp = rows_of, hp  # request indices -> their rows
        self.h = reads.h  # (B, S, d)
        self.kl_before: torch.Tensor | None = None  # (B, V) log p at the KL prompts before any δ: first measure
        self.h_norm = self.h.norm(dim=2)  # (B, S)
        rms = (self.h_norm / self.h.shape[2] ** 0.5)[..., None]
        self.scale = rms if hp.v_lr_relative else torch.ones_like(rms)  # Adam's step is then relative to rms(h)
        self.u = torch.zeros_like(self.h, requires_grad=True)
        self.opt = torch.optim.Adam([self.u], lr=hp.v_lr)
        self.live = torch.arange(len(self.h), device=self.h.device)
        self.rows, self.reads = rows, reads

    @property
    def delta(self) -> torch.Tensor:
        return self.u * self.scale

    def measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (b,), NLL (b,)) of the ``live`` requests at the current δ, with the graph for ``step``."""
        part = self.delta[self.live]  # (b, S, d)
        if self.kl_before is None:
            # δ is still 0 and every request live: this forward is the unedited one, so the KL reference is read
            # from it instead of from a forward of its own.
            logits = self.reads.checked_logits(part)
            self.kl_before = torch.log_softmax(logits[len(self.rows.read_row) :].detach(), -1)
        else:
            logits = self.reads.logits(part)
        return _losses(logits, self.rows, self.kl_before[self.live], part, self.h_norm[self.live], self.hp)

    def step(self, loss: torch.Tensor, active: torch.Tensor) -> None:
        """One Adam step on the active requests' δ; converged ones keep the δ their last loss was measured at."""
        frozen = self.u.detach().clone()
        self.opt.zero_grad()
        (loss * active[self.live]).sum().backward()
        self.opt.step()
        with torch.no_grad():
            self.u[~active] = frozen[~active]
            norm = self.delta.norm(dim=2)  # (B, S)
            limit = self.hp.clamp_norm_factor * self.h_norm
            self.u.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm))[..., None])

    def keep_rows_of(self, active: torch.Tensor) -> None:
        """Narrow the reads to the active requests once they are fewer than ``NARROW_BELOW`` of the live ones."""
        if int(active.sum()) < NARROW_BELOW * len(self.live):
            stay = active[self.live].nonzero().squeeze(1)  # which live requests stay, as indices into the reads
            self.live = active.nonzero().squeeze(1)
            self.rows = self.rows_of(self.live.tolist())
            self.reads = self.reads.select(stay, self.rows)


def _optimise(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    sites: Sequence[str],
    layer: int,
    contexts: Sequence[str],
    hp: EditHparams,
    *,
    fast: bool,
) -> ValueResult:
    """δ (B, S, d) for B requests at S sites by Adam (`_DeltaSearch`) until `_Stopping` says each is done;
    returns init/targets (B, S, d). Converged requests keep their δ and leave the forward."""
    t0 = time.perf_counter()

    def rows_of(indices: Sequence[int]) -> _Rows:
        return _build_rows(tokenizer, [requests[i] for i in indices], contexts, hp.kl_prompt)

    rows = rows_of(range(len(requests)))
    reads = _Reads(model, tokenizer, spec, rows, sites, layer, fast)
    search, stopping = _DeltaSearch(rows_of, reads, rows, hp), _Stopping(hp)
    n_req, device = len(requests), reads.h.device
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    steps = torch.zeros(n_req, dtype=torch.long)
    last_nll, last_loss = torch.zeros(n_req, device=device), torch.zeros(n_req, device=device)
    first_nll = None
    for it in range(hp.v_num_grad_steps):
        loss, nll = search.measure()  # (b,) for the live requests
        bad = ~torch.isfinite(loss)
        if bad.any():
            case = requests[int(search.live[bad.nonzero()[0]])].case_id
            raise NonFiniteLossError(
                f"case {case}: the v* loss became {loss[bad][0].item()} at step {it} at {', '.join(sites)}; "
                "lower v_lr or clamp_norm_factor in the hparams, or check the model's dtype"
            )
        last_nll[search.live], last_loss[search.live] = nll.detach(), loss.detach()
        first_nll = last_nll.clone() if first_nll is None else first_nll
        steps[active.cpu()] = it + 1
        active &= ~stopping.done(last_loss.clone(), last_nll.clone())
        if not active.any() or it == hp.v_num_grad_steps - 1:
            break
        search.step(loss, active)
        search.keep_rows_of(active)

    h, delta = reads.h.detach(), search.delta.detach()
    # One site: z = h + δ. Several: each site's value in the final forward, upstream shifts included.
    targets = h + delta if len(sites) == 1 else reads.site_values(delta)
    elapsed = time.perf_counter() - t0
    assert first_nll is not None
    info = [
        {
            "case_id": req.case_id,
            "nll_start": float(first_nll[r]),
            "nll_end": float(last_nll[r]),
            "loss_end": float(last_loss[r]),
            "steps": int(steps[r]),
            "delta_over_h": float((delta[r].norm(dim=1) / search.h_norm[r]).mean()),
            "seconds": elapsed / n_req,
        }
        for r, req in enumerate(requests)
    ]
    for item in info:
        log.debug("v* %s", item)
    return ValueResult(init=h, targets=targets, info=info, delta=delta)
