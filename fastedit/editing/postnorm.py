"""Editing through a post-MLP RMSNorm (Gemma 2/3): map a wanted residual change back to the matrix's output.

In these families block i adds N_i(m) = g ⊙ m / rms(m) to the residual, where m (d_model,) is the output of
the edited matrix W (``mlp_out``) and g (d_model,) the norm's gain. The closed forms solve ΔW K = ΔM for a
wanted change ΔM of W's *output*, so a wanted *residual* change r (what MEMIT spreads) must be mapped through
N_i first. Two facts make the naive mappings fail:

* N is scale invariant, so its outputs form the ellipsoid {g ⊙ u : rms(u) = 1}: a layer cannot add an
  arbitrary r, only move its output along that surface. Ignoring the norm (ΔM = r) asks W for a change
  ~200x too large in pre-norm units (|m| ≈ 4 while |N(m)| ≈ 800 at Gemma 3 270M's layers 3-7), which drags
  every other key's output along; dividing by the gain (ΔM = r/g·rms(m)) leaves the surface, so
  renormalisation moves the residual elsewhere, and gains near 0 blow the target up.
* The reachable output closest to the wanted one, n* = N(m) + r, is a trust-region problem with a
  closed form:  min_u ‖g ⊙ u − n*‖²  s.t.  ‖u‖² = d   →   u_j = g_j n*_j / (g_j² + μ),
  with the scalar μ > −min_j g_j² found by bisection so that ‖u‖² = d (‖u(μ)‖ decreases monotonically in μ).

Any m' = s·u (s > 0) then gives exactly N(m') = g ⊙ u; fastedit picks s = ⟨u, m⟩ / d, the scale that makes
‖m' − m‖ smallest (floored at a tenth of rms(m) when u points away from m), so ΔW stays as small as the
wanted change allows. The unreachable part of r is left for the next layers: the engine re-measures the
residual gap after each layer's update, as MEMIT does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastedit.arch import ArchSpec
from fastedit.editing.keys import read_at_subject
from fastedit.errors import ConfigError
from fastedit.requests import EditRequest

BISECTION_STEPS = 200  # float64 bisection on μ: far below any tolerance that matters after 200 halvings
MIN_SCALE = 0.1  # floor of s / rms(m)
GAIN_FLOOR = 1e-4  # gains below this fraction of the largest are treated as 0 (they do not move the output)


@torch.no_grad()
def rms_norm_gain(norm: torch.nn.Module, width: int) -> torch.Tensor:
    """The gain g (width,) of an RMSNorm module, read by probing it (no assumption on how it stores g).

    N(1) = g / sqrt(1 + eps) ≈ g. Checked on a random input: N(x) must equal g ⊙ x / rms(x) and be scale
    invariant; anything else (a LayerNorm with mean subtraction or a bias) is refused with a clear error.
    """
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gain = norm(torch.ones(1, width, dtype=dtype, device=device)).double()[0]
    probe = torch.randn(1, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = norm(probe.to(dtype=dtype, device=device)).double()[0]
    scaled = norm((3.0 * probe).to(dtype=dtype, device=device)).double()[0]
    expected = gain * probe[0] / probe[0].pow(2).mean().sqrt()
    tol = 1e-2 * float(expected.abs().max()) + 1e-6
    if not (torch.allclose(out, expected, atol=tol) and torch.allclose(out, scaled, atol=tol)):
        raise ConfigError(
            f"the post-MLP norm {type(norm).__name__} does not behave as an RMSNorm (g ⊙ x / rms(x)); "
            "the post-norm edit treatment needs one; register the family without post_mlp_norm or add support"
        )
    return gain


def nearest_reachable(wanted: torch.Tensor, gain: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, d) with rms(u) = 1 minimising ‖g ⊙ u − wanted‖ per row (wanted (B, d), gain (d,)); float64.

    u(μ) = g ⊙ n* / (g² + μ), with μ found by bisection. Dimensions whose gain is ~0 do not move the output
    but take part of the budget ‖u‖² = d, so with any of them the constraint on the others is ‖u_free‖² ≤ d:
    μ = 0 (u_free = n*/g) when that fits, else μ > 0. Without them it is ‖u‖² = d, μ ∈ (−min g², ∞). The
    zero-gain dimensions then take the rest of the budget along ``fixed`` (B, d), the current direction.
    """
    n_star, g = wanted.double(), gain.double()
    batch, d = n_star.shape
    free = g.abs() > GAIN_FLOOR * g.abs().max()  # (d,)
    g2 = torch.where(free, g.pow(2), 1.0)
    gn = torch.where(free, g * n_star, 0.0)  # (B, d)
    length2 = lambda mu: (gn / (g2 + mu)).pow(2).sum(dim=1, keepdim=True)  # noqa: E731  ‖u_free(μ)‖², (B, 1)
    if bool(free.all()):
        lo = torch.full((batch, 1), -float(g2.min()), dtype=torch.float64)
    else:
        lo = torch.zeros(batch, 1, dtype=torch.float64)
    # ‖u(μ)‖ ≤ ‖g ⊙ n*‖ / (min g² + μ): at μ = hi that bound is ≤ 1e-3·sqrt(d).
    hi = lo + gn.norm(dim=1, keepdim=True) / (1e-3 * d**0.5) + 1.0
    fits = (length2(lo) <= d) if not bool(free.all()) else torch.zeros(batch, 1, dtype=torch.bool)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        too_long = length2(mid) > d
        lo = torch.where(too_long, mid, lo)
        hi = torch.where(too_long, hi, mid)
    mu = torch.where(fits, torch.zeros_like(hi), hi)
    u = gn / (g2 + mu)
    if bool(free.all()):
        return u
    rest = (d - u.pow(2).sum(dim=1, keepdim=True)).clamp_min(0.0).sqrt()  # (B, 1)
    direction = torch.ones_like(n_star) if fixed is None else fixed.double()
    direction = torch.where(free, 0.0, direction)
    dnorm = direction.norm(dim=1, keepdim=True)
    direction = torch.where(
        dnorm > 0, direction / dnorm.clamp_min(1e-300), torch.where(free, 0.0, 1.0) / (~free).sum() ** 0.5
    )
    return u + rest * direction


def pre_norm_targets(
    current: torch.Tensor, wanted_change: torch.Tensor, gain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔM, reached), both (B, d): the change of W's output m that moves N(m) as close as reachable to
    N(m) + r, and the residual change N(m + ΔM) − N(m) it makes.

    current: m at the subject's last token (B, d); wanted_change: r (B, d), the residual change asked of
    this layer. ΔM = m' − m with m' = s·u, u = nearest_reachable(N(m) + r), s = max(⟨u, m⟩/d, 0.1·rms(m)).
    """
    m = current.double()
    rms = m.pow(2).mean(dim=1, keepdim=True).sqrt()  # (B, 1)
    n_now = gain.double() * m / rms
    u = nearest_reachable(n_now + wanted_change.double(), gain, fixed=m / rms)
    s = ((u * m).sum(dim=1, keepdim=True) / m.shape[1]).clamp_min(MIN_SCALE * rms)
    return s * u - m, gain.double() * u - n_now


def mlp_outputs(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    layer: int,
    contexts: Sequence[str],
) -> torch.Tensor:
    """m: the output of ``mlp_out`` at ``layer`` at each request's subject (bare prompt), (B, d_model)."""
    name = spec.path("mlp_out", layer)
    read = read_at_subject(model, tokenizer, spec, requests, contexts[:1], stop_layer=layer, outputs_of=[name])
    return read[f"out:{name}"][:, 0]


def post_norm_gain(model: torch.nn.Module, spec: ArchSpec, layer: int) -> torch.Tensor:
    """g (d_model,) of the post-MLP norm of ``layer`` (float64)."""
    if spec.post_mlp_norm is None:
        raise ConfigError(f"{spec.model_type} has no post-MLP norm")
    return rms_norm_gain(model.get_submodule(spec.path("post_mlp_norm", layer)), spec.d_model(model.config))
