"""Values the engine reads from a config section and a recipe file alike: the regexes of
--custom-q rules (pins, group matches, the experts of a split budget)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import RecipeError

# Constructs Python's re accepts but std::regex's ECMAScript grammar does not, or reads
# differently; refused so that the planner's matches are the engine's.
_UNPORTABLE = [
    (re.compile(r"\(\?P"), "Python named groups (?P...)"),
    (re.compile(r"\(\?<"), "lookbehind or named groups (?<...)"),
    (re.compile(r"\(\?[a-zA-Z#>]"), "inline flags, comments or atomic groups (?...)"),
    (re.compile(r"\\[AZz]"), "Python-only anchors \\A \\Z"),
    (re.compile(r"\[\[?[:=.]"), "POSIX classes [[:alpha:]] (Python reads them differently)"),
    (re.compile(r"(?<!\\)[*+?}]\+"), "possessive quantifiers"),
]


def check_regex(pattern: Any, where: str) -> str:
    """A --custom-q pattern that the engine and Python read alike, or RecipeError."""
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(f"{where}: must be a non-empty regex")
    if "," in pattern:
        raise RecipeError(f"{where}: {pattern!r} contains ',' which llama-quantize uses to split --custom-q "
                          "rules (write {m,n} quantifiers out as alternations)")
    if "=" in pattern:
        raise RecipeError(f"{where}: {pattern!r} contains '=' which llama-quantize uses to split regex from type")
    if any(c.isspace() for c in pattern):
        raise RecipeError(f"{where}: {pattern!r} contains whitespace (tensor names have none)")
    for rx, what in _UNPORTABLE:
        if rx.search(pattern):
            raise RecipeError(f"{where}: {pattern!r} uses {what}, which the engine's std::regex (ECMAScript) "
                              "does not read like Python")
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"{where}: invalid regex {pattern!r}: {e}") from None
    return pattern
