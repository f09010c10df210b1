"""The subject's last-token index in a templated prompt, BOS-aware, via prefix tokenisation.

Tokenising the subject alone gives the wrong ids (no leading space, merges across the boundary); instead
tokenise the text up to the subject and up to the subject's end, with the tokenizer's own special tokens
(a BOS when it adds one), and take the length of the latter minus one.
"""

from __future__ import annotations

from typing import Any

from fastedit.errors import FasteditError


class SubjectNotFoundError(FasteditError):
    """The request's prompt template has no ``{}`` or its subject is empty."""


def check_template(template: str, subject: str, case: str) -> None:
    if "{}" not in template:
        raise SubjectNotFoundError(
            f"case {case}: prompt {template!r} has no '{{}}' where the subject {subject!r} goes; "
            "write the prompt as a template (e.g. '{} is located in')"
        )
    if not subject.strip():
        raise SubjectNotFoundError(f"case {case}: the subject is empty; give the subject that '{{}}' stands for")


def subject_last_index(tokenizer: Any, template: str, subject: str, case: str = "?") -> int:
    """Index of the subject's last token in ``tokenizer(template.replace("{}", subject, 1))``.

    template: the full text with one ``{}`` (context prefixes and target suffixes included).
    """
    check_template(template, subject, case)
    head = template[: template.index("{}")]
    # "... of " + "Lyon": the trailing space merges into the subject's first token (" Lyon"), so the prefix
    # is counted without it (as the reference tools do).
    bare_head = head[:-1] if head.endswith(" ") else head
    n_head = len(tokenizer(bare_head).input_ids) if bare_head else _n_special_prefix(tokenizer)
    n_with = len(tokenizer(head + subject).input_ids)
    if n_with <= n_head:
        raise SubjectNotFoundError(f"case {case}: subject {subject!r} adds no token to the prompt {template!r}")
    return n_with - 1


def _n_special_prefix(tokenizer: Any) -> int:
    """How many tokens the tokenizer puts before any text (1 with a BOS, else 0)."""
    return len(tokenizer("").input_ids)
