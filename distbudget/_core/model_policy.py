"""Which model a limit or a rate names, checked when a budget is built. Pure: no I/O.

Every call, limit and rate override is keyed by the canonical model id the price book resolves
(:func:`distbudget._core.models.canonical_model`): ``openai/gpt-4o``, ``GPT-4o`` and
``gpt-4o-2024-08-06`` all count against a limit on ``gpt-4o``. A name the book does not know keeps
its spelling as its id. A limit on such a name is a likely mistake (a typo never matches a call), so
it warns when the budget is built (``strict_models=True`` raises :class:`UnknownModelError`):

- always, when the budget has no ``default_rates`` (no call on that model could even be priced);
- with ``default_rates``, when the name is one edit away from a model the book knows (``gpt4o``).

A rate override for a name the table does not know *defines* that model (a house model), so it warns
only when it looks like a typo of a known model.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable

from distbudget._core.errors import BudgetWarning, UnknownModelError

SIMILAR = 0.8  # difflib ratio above which an unknown name is taken for a typo of a known one


def lookalike(name: str, known: Iterable[str]) -> str | None:
    """The known model ``name`` is most probably a misspelling of, or None."""
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=SIMILAR)
    return close[0] if close else None


def unknown_model_problems(
    limits: Iterable[tuple[str, str, str]],
    rate_names: Iterable[str],
    model_id: Callable[[str], str | None],
    table_id: Callable[[str], str | None],
    table_models: Iterable[str],
    has_default_rates: bool,
) -> list[str]:
    """What is wrong with the models named by ``limits`` ((scope, limit type, model) each) and by the
    keys of ``rates``. ``model_id``: the budget's resolver (custom rates and the table);
    ``table_id``: the price table's alone; ``table_models``: the ids the table knows."""
    table = sorted(set(table_models))
    custom = sorted(set(rate_names))
    problems = []
    for scope, limit_type, model in limits:
        if model_id(model) is not None:
            continue
        near = lookalike(model, [*table, *custom])
        if has_default_rates and near is None:
            continue
        hint = f" (did you mean {near!r}?)" if near else ""
        problems.append(
            f"scope {scope!r}: limit {limit_type!r} names model {model!r}, which no price or rates= entry "
            f"knows: it would never match a call{hint}"
        )
    for name in custom:
        if table_id(name) is not None:
            continue
        near = lookalike(name, table)
        if near is not None:
            problems.append(
                f"rates= names model {name!r}, which the price table does not know (did you mean {near!r}?); "
                "its rates apply to that name only"
            )
    return problems


def check_models(problems: list[str], strict: bool) -> None:
    """Warn once per problem (``BudgetWarning``), or raise ``UnknownModelError`` when ``strict``."""
    if problems and strict:
        raise UnknownModelError("; ".join(problems) + " (strict_models=True)")
    for problem in problems:
        warnings.warn(problem + "; pass strict_models=True to make this an error", BudgetWarning, stacklevel=5)
