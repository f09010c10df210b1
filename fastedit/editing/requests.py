"""One typed edit request, whatever layout it came from (original CounterFact, flat CounterFact, zsRE, plain)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``subject``'s fact in ``prompt`` to ``target_new``.

    ``prompt`` is a template with ``{}`` where the subject goes. Targets are stored without a leading space;
    scoring and v* optimisation use ``" " + target``. Neighbourhood prompts are complete prompts about other
    subjects whose true answers (``neighborhood_answers``, one per prompt, or ``target_true`` when empty) must not
    move towards ``target_new``.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def rewrite_prompt(self) -> str:
        """The prompt with the subject filled in (``str.replace``: other braces in the text are left alone)."""
        return self.prompt.replace("{}", self.subject, 1)
