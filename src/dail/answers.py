"""Answers: where a text states its result. One parser, shared by grading and landmarks.

Two shapes of stated result are recognized, by fixed rules:

- a box: `\\boxed{...}` or `\\fbox{...}` (spaces allowed before the brace). The content runs
  to the matching closing brace; escaped braces `\\{` `\\}` do not count. A box that is never
  closed is skipped. Boxes are returned in the order of their opening command, nested ones
  included (an outer box comes before the boxes inside it).
- a final-answer line: `#### 42`, `The answer is ...`, `Final answer: ...` or
  `The final answer is ...` (case-insensitive, `:` or the full-width `：` allowed). The answer
  starts after the phrase and ends with its sentence: at the first `. ` (a period and a space),
  else at the end of the line. Markdown bold `**...**`, a final period and a wrapping
  `$...$` / `$$...$$` are removed (`trim_line_answer`).

Grading (`dail.grading.extract_answer`) takes the last box, else the last final-answer line.
Landmarks (`dail.landmarks`) take every box and every final-answer line, and tidy each further
(a leading math span only, no trailing clause); that tidying is theirs, not part of this
parser, so the graded answer of a text never changes when the landmark rules do.

The paper does not specify answer extraction; these rules are ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Extracted", "BOX_OPEN", "boxes", "final_answers", "trim_line_answer"]


@dataclass
class Extracted:
    """An answer found in a text and where it sits: `text[start:end] == answer` (before stripping)."""
    answer: str
    start: int
    end: int


# The opening of a box, up to and including its `{`; `m.end()` is where the content starts.
BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A final-answer phrase and the rest of its line (group 1, starting at its first non-space).
_FINAL = re.compile(r"(?:####|\bfinal answer(?:\s+is\b|\s*[:：])|\bthe answer is\b)\s*[:：]?[ \t]*(\S[^\n]*)",
                    re.IGNORECASE)


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of the `}` that closes it; escaped characters (`\\{`) are skipped.

    One pass with a stack, so a text full of unclosed `\\boxed{` (a model stuck in a loop)
    costs linear time, not quadratic. A `}` with nothing open is ignored.
    """
    pairs, stack, i = {}, [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def boxes(text: str) -> list[Extracted]:
    """Every `\\boxed{...}` / `\\fbox{...}` with balanced braces, in order of the command."""
    if "box" not in text:
        return []
    pairs = _brace_pairs(text)
    # The box's own `{` is never escaped (a letter or space precedes it), so the pass above sees it.
    return [Extracted(text[m.end():pairs[m.end() - 1]], m.end(), pairs[m.end() - 1])
            for m in BOX_OPEN.finditer(text) if m.end() - 1 in pairs]


def trim_line_answer(s: str) -> str:
    """The answer at the start of a final-answer line: its sentence, without bold, period or `$`."""
    s = re.split(r"\.\s", s.strip(), maxsplit=1)[0]  # the answer ends with its sentence: "7. Let me ..."
    s = re.sub(r"^\*+|\*+$", "", s).strip()        # markdown bold
    s = s.rstrip(".。").strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":  # $...$ or $$...$$
        s = s.strip("$").strip()
    return s


def final_answers(text: str) -> list[Extracted]:
    """Every final-answer line's answer, in order; `answer` may be "" when nothing is left after trimming.

    Empty ones are kept so that a caller taking the last line sees that the last line is empty
    (grading then reports no answer rather than falling back to an earlier line).
    """
    out = []
    for m in _FINAL.finditer(text):
        raw = m.group(1)
        answer = trim_line_answer(raw)
        start = m.start(1) + raw.find(answer) if answer and answer in raw else m.start(1)
        out.append(Extracted(answer, start, start + len(answer)))
    return out
