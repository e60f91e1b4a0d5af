"""Landmarks: the coarse results of a solution, without its derivation.

The negative reference sees the problem plus these landmarks, so it predicts the tokens a
model would write when it "knows where to land" but not how to get there (the paper's
rationalization shortcuts). The paper extracts them for math with a fixed regex; the rules
here are ours, written down exactly:

math (default), in order of appearance, duplicates dropped:
- the content of every `\\boxed{...}` (braces balanced);
- the right-hand side (last member) of every equation or `=` chain, including GSM8K's
  calculator annotations `<<48/2=24>>` (the annotation's result counts as an equation);
- a final-answer line: `#### 42` or `The answer is ...`.

code: function signatures only (`def f(x):`, `function f(a, b)`, `fn f(x: i32) -> i32`).

regex:PATTERN: every match of a user pattern (group 1 if it has one).

An example may carry its own `landmarks` list, which overrides extraction (see `data.py`).
"""

from __future__ import annotations

import re

__all__ = ["extract_landmarks", "KINDS"]

_CALC = re.compile(r"<<([^<>]*?)>>")
# One operand: a run of non-space characters other than clause punctuation. Operands joined by
# binary operators (with or without spaces) make one expression, so `70 + 99 + 70` is one member.
_OPERAND = r"[^\s,;=<>]+"
_EXPR = re.compile(rf"{_OPERAND}(?:\s*[-+*/^×÷·]\s*{_OPERAND})*")
_FINAL = re.compile(r"^\s*####\s*(.+?)\s*$|the (?:final )?answer is[:\s]*\$?(.+?)\$?\s*(?:\.\s*)?$",
                    re.IGNORECASE | re.MULTILINE)
_SIGNATURE = re.compile(
    r"^\s*(?:async\s+)?def\s+\w+\s*\([^)]*\)\s*(?:->\s*[^:]+)?:"
    r"|^\s*(?:export\s+)?(?:async\s+)?function\s*\*?\s*\w+\s*\([^)]*\)"
    r"|^\s*(?:pub(?:\([^)]*\))?\s+)?fn\s+\w+\s*(?:<[^>]*>)?\s*\([^)]*\)(?:\s*->\s*[^{]+)?",
    re.MULTILINE)


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of every \\boxed{...} with balanced braces."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end():i - 1].strip()))
    return out


def _clean(value: str) -> str:
    value = value.strip().strip("$").strip()
    value = re.sub(r"[.,;:]+$", "", value)  # sentence punctuation after a result
    # Drop unbalanced closing brackets picked up from the surrounding text, e.g. "(x = 3)".
    for open_, close in ("()", "[]", "{}"):
        while value.endswith(close) and value.count(close) > value.count(open_):
            value = value[:-1].rstrip()
    return value


def _rhs_of_chains(text: str, offset: int = 0) -> list[tuple[int, str]]:
    """Last member of every `=` chain. `a = b = c` gives only `c`; `x=1 and y=2` gives 1 and 2."""
    out = []
    for m in re.finditer(r"(?<![<>!=])=(?!=)", text):
        rest = text[m.end():]
        lead = len(rest) - len(rest.lstrip(" \t"))
        e = _EXPR.match(rest, lead)
        if not e:
            continue
        after = rest[e.end():].lstrip(" \t")
        if after.startswith("=") and not after.startswith("=="):
            continue  # not the last member of the chain
        value = _clean(e.group(0))
        if value:
            out.append((offset + m.start(), value))
    return out


def _math(solution: str) -> list[tuple[int, str]]:
    found = _boxed(solution)
    # Calculator annotations are equations of their own; take them out of the prose so the
    # prose pass sees `... = 12 inches` rather than `... = <<6*2=12>>12 inches`.
    for m in _CALC.finditer(solution):
        found += _rhs_of_chains(m.group(1), offset=m.start())
    prose = _CALC.sub(lambda m: " " * len(m.group(0)), solution)  # keep positions aligned
    prose_no_boxed = re.sub(r"\\boxed\s*\{", lambda m: " " * len(m.group(0)), prose)
    found += _rhs_of_chains(prose_no_boxed)
    for m in _FINAL.finditer(prose):
        value = _clean(m.group(1) or m.group(2) or "")
        if value:
            found.append((m.start(), value))
    return found


def _code(solution: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(0).strip()) for m in _SIGNATURE.finditer(solution)]


def _regex(solution: str, pattern: str) -> list[tuple[int, str]]:
    try:
        rx = re.compile(pattern, re.MULTILINE)
    except re.error as e:
        raise ValueError(f"landmark extractor 'regex:{pattern}': invalid pattern ({e})") from None
    return [(m.start(), (m.group(1) if rx.groups else m.group(0)).strip()) for m in rx.finditer(solution)]


KINDS = ("math", "code", "regex:PATTERN")


def extract_landmarks(solution: str, kind: str = "math") -> list[str]:
    """Coarse results of `solution`, in order, without duplicates. `kind`: math|code|regex:PATTERN."""
    if kind == "math":
        found = _math(solution)
    elif kind == "code":
        found = _code(solution)
    elif kind.startswith("regex:"):
        found = _regex(solution, kind[len("regex:"):])
    else:
        raise ValueError(f"unknown landmark extractor {kind!r}; expected one of {', '.join(KINDS)}")
    seen, out = set(), []
    for _, value in sorted(found, key=lambda t: t[0]):
        if value and value not in seen:
            seen.add(value)
            out.append(value)
    return out
