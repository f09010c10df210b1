"""EasyEdit's spellings, read into fastedit's: ``editor.edit(prompts=, target_new=, subject=, ground_truth=,
rephrase_prompts=, locality_inputs=)`` keywords, per-request ``locality`` dicts, and hparams YAML files.

EasyEdit's ``locality_inputs`` is ``{name: {"prompt": [one per request], "ground_truth": [one per request]}}``
(an entry may itself be a list, or None for no prompt); each request then carries ``locality = {name: {"prompt":
..., "ground_truth": ...}}``. Every name (``neighborhood``, ``Relation_Specificity``, ...) becomes neighbourhood
prompts with their true answers. ``portability`` has no fastedit metric: it is dropped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastedit.errors import ConfigError, RequestError

log = logging.getLogger(__name__)

EASYEDIT_KEYWORDS = (
    "prompts",
    "target_new",
    "subject",
    "ground_truth",
    "rephrase_prompts",
    "locality_inputs",
    "portability_inputs",
)


def _answer(value: Any, where: str) -> str:
    """A true answer: a string, or the first of a list of aliases (EasyEdit allows both)."""
    while isinstance(value, (list, tuple)):
        if not value:
            raise RequestError(f"{where}: empty answer list")
        value = value[0]
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a string answer, got {type(value).__name__}")
    return value


def locality_pairs(locality: Any, where: str = "locality") -> tuple[list[str], list[str]]:
    """(prompts, answers) from one request's ``{name: {"prompt": p, "ground_truth": a}}`` (p, a: str or lists)."""
    if locality is None:
        return [], []
    if not isinstance(locality, Mapping):
        raise RequestError(f"{where} must be a mapping {{name: {{'prompt': ..., 'ground_truth': ...}}}}")
    prompts: list[str] = []
    answers: list[str] = []
    for name, entry in locality.items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping) or "prompt" not in entry or "ground_truth" not in entry:
            raise RequestError(f"{where}[{name!r}] must be a mapping with 'prompt' and 'ground_truth'")
        p, a = entry["prompt"], entry["ground_truth"]
        if p is None:
            continue
        ps = [p] if isinstance(p, str) else list(p)
        as_ = [a] if isinstance(a, str) else list(a)
        if len(ps) != len(as_):
            raise RequestError(f"{where}[{name!r}]: {len(ps)} prompt(s) but {len(as_)} ground_truth answer(s)")
        for i, (prompt, answer) in enumerate(zip(ps, as_, strict=True)):
            if not isinstance(prompt, str):
                raise RequestError(f"{where}[{name!r}] prompt {i} must be a string")
            prompts.append(prompt)
            answers.append(_answer(answer, f"{where}[{name!r}] ground_truth {i}").strip())
    return prompts, answers


def _per_request(value: Any, n: int, name: str) -> list[Any]:
    if value is None:
        return [None] * n
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if len(value) != n:
        raise RequestError(f"{name}: {len(value)} value(s) for {n} prompt(s); give one per prompt")
    return value


def _locality_per_request(inputs: Any, n: int, name: str) -> list[dict[str, Any]]:
    """EasyEdit's ``locality_inputs`` (one entry per request under each name) as per-request dicts."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    if inputs is None:
        return out
    if not isinstance(inputs, Mapping):
        raise RequestError(f"{name} must be a mapping {{name: {{'prompt': [...], 'ground_truth': [...]}}}}")
    for key, entry in inputs.items():
        if not isinstance(entry, Mapping) or "prompt" not in entry or "ground_truth" not in entry:
            raise RequestError(f"{name}[{key!r}] must be a mapping with 'prompt' and 'ground_truth' lists")
        prompts, truths = entry["prompt"], entry["ground_truth"]
        if isinstance(prompts, str):  # EasyEdit: a single request's locality may be given bare
            prompts, truths = [prompts], [truths]
        prompts = _per_request(prompts, n, f"{name}[{key!r}]['prompt']")
        truths = _per_request(truths, n, f"{name}[{key!r}]['ground_truth']")
        for i, (p, t) in enumerate(zip(prompts, truths, strict=True)):
            if p is not None:
                out[i][key] = {"prompt": p, "ground_truth": t}
    return out


def easyedit_records(
    prompts: Sequence[str] | str,
    target_new: Sequence[str] | str,
    subject: Sequence[str] | str | None = None,
    ground_truth: Sequence[Any] | str | None = None,
    rephrase_prompts: Sequence[Any] | str | None = None,
    locality_inputs: Mapping[str, Any] | None = None,
    portability_inputs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """EasyEdit's ``edit(...)`` keyword lists as flat-layout request records (parsed by `requests.py`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if not n:
        raise RequestError("prompts is empty; give at least one prompt")
    if subject is None:
        raise RequestError("subject is required: fastedit's editors locate the subject's last token in the prompt")
    targets = _per_request(target_new, n, "target_new")
    subjects = _per_request(subject, n, "subject")
    truths = _per_request(ground_truth, n, "ground_truth")
    rephrases = _per_request(rephrase_prompts, n, "rephrase_prompts")
    localities = _locality_per_request(locality_inputs, n, "locality_inputs")
    if portability_inputs:
        log.warning(
            "portability_inputs ignored: fastedit has no portability metric (%s)", ", ".join(portability_inputs)
        )
    return [
        {
            "case_id": str(i),
            "prompt": prompts[i],
            "subject": subjects[i],
            "target_new": targets[i],
            "ground_truth": _answer(truths[i], f"ground_truth[{i}]") if truths[i] is not None else None,
            "rephrase_prompt": rephrases[i],
            "locality": localities[i],
        }
        for i in range(n)
    ]


def requests_from_keywords(requests: Any, keywords: Mapping[str, Any]) -> Any:
    """``requests`` as given, or built from EasyEdit keywords (``prompts=...``); unknown keywords are refused."""
    unknown = sorted(set(keywords) - set(EASYEDIT_KEYWORDS))
    if unknown:
        raise ConfigError(
            f"unknown keyword(s) {', '.join(unknown)} for fastedit.edit; EasyEdit-style keywords accepted: "
            f"{', '.join(EASYEDIT_KEYWORDS)}"
        )
    if not keywords:
        if requests is None:
            raise RequestError("no requests: pass requests (a file, records, EditRequests) or prompts=/target_new=")
        return requests
    if requests is not None:
        raise RequestError("pass either requests or EasyEdit keywords (prompts=, target_new=, ...), not both")
    if "prompts" not in keywords or "target_new" not in keywords:
        raise RequestError("EasyEdit-style requests need prompts= and target_new= (and subject=)")
    return easyedit_records(**keywords)


# ---- hparams YAML -------------------------------------------------------------------------------------------

# EasyEdit key -> fastedit EditHparams field (same meaning: EasyEdit follows the ROME/MEMIT reference code).
# Not mapped on purpose: AlphaEdit's nullspace_threshold (absolute there, relative to C0's largest eigenvalue
# here). emmet_lambda is EMMET's μ, which makes its update MEMIT's at λ·μ (fastedit logs that).
HPARAM_KEYS = {
    "layers": "layers",
    "clamp_norm_factor": "clamp_norm_factor",
    "v_lr": "v_lr",
    "v_num_grad_steps": "v_num_grad_steps",
    "v_weight_decay": "v_weight_decay",
    "kl_factor": "kl_factor",
    "mom2_update_weight": "mom2_update_weight",
    "L2": "alphaedit_l2",
    "emmet_lambda": "emmet_mu",
}
_ALG_NAMES = {"ROME": "rome", "MEMIT": "memit", "EMMET": "emmet", "ALPHAEDIT": "alphaedit"}


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hparams file {str(path)!r} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of hyperparameters, got {type(data).__name__}")
    return data


def easyedit_hparams(method: str, path: str | Path, base: Any | None) -> Any:
    """An EasyEdit hparams YAML as `EditHparams`: mapped keys override ``base`` (fastedit's file for the model,
    None when there is none); every key that does not map is named in one warning."""
    from fastedit.editing.hparams import EditHparams

    raw = read_yaml(path)
    alg = str(raw.get("alg_name", "")).upper()
    if alg and _ALG_NAMES.get(alg) != method:
        raise ConfigError(f"{path}: alg_name {raw['alg_name']!r} is not the method {method!r}")
    mapped: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in HPARAM_KEYS:
            continue
        name = HPARAM_KEYS[key]
        try:  # YAML 1.1 reads EasyEdit's "5e-1" as a string; every mapped field is numeric
            if name == "layers":
                mapped[name] = tuple(int(x) for x in ([value] if isinstance(value, int) else value))
            else:
                mapped[name] = int(value) if name == "v_num_grad_steps" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: {key}: {value!r} is not a number (list of integers for layers)") from None
    if "v_lr" in mapped:
        mapped["v_lr_relative"] = False  # EasyEdit's v_lr is an absolute Adam step
    ignored = sorted(k for k in raw if k not in HPARAM_KEYS and k != "alg_name")
    if ignored:
        log.warning("%s: EasyEdit key(s) with no fastedit equivalent, ignored: %s", path, ", ".join(ignored))
    provenance = {"source": str(path), "easyedit_ignored": ignored}
    try:
        if base is not None:
            return base.replace(**mapped, extra={**base.extra, **provenance})
        return EditHparams(method=method, **mapped, extra=provenance)
    except TypeError as exc:
        raise ConfigError(
            f"{path}: {exc}; fastedit has no {method} hparams for this model to fill the keys the YAML lacks"
        ) from None
