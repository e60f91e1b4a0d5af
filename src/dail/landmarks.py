"""Landmarks: the coarse results of a solution, without its derivation.

The negative reference sees the problem plus these landmarks, so it predicts the tokens a
model would write when it "knows where to land" but not how to get there (the paper's
rationalization shortcuts). The paper extracts them for math with "a fixed regex"; the rules
here are ours, written down exactly.

math (default). Three sources, merged in order of position (where each value starts in the
solution), duplicates dropped:

1. Boxes: the content of every `\\boxed{...}` / `\\fbox{...}` (braces balanced; the parser is
   `dail.answers`, shared with grading). The content is taken whole: an `=` inside a box is
   not an equation of its own, and a box inside another box is not taken separately.
2. Equations: the right-hand side, i.e. the last member, of every `=` chain. `a = b = c`
   gives `c` only; `x = 1, y = 2` gives `1` and `2`. `==`, `<=`, `>=`, `!=`, `:=`, `<`, `>`,
   `≤`, `≥`, `≠`, `\\le`, `\\ge`, `\\neq`, `\\approx`, `\\equiv` are not equations, and they end
   a chain. How far a member reaches depends on where its `=` sits:
   - In math: inline `$...$` and `\\(...\\)`, display `$$...$$` and `\\[...\\]`, and the
     environments equation, align, alignat, flalign, gather, multline, eqnarray (starred or
     not; aligned, gathered and split inside math are read the same way). Only an `=` outside
     every bracket counts, so `\\sum_{i=1}` and `P(X=3)` hold no equation. A member runs to the
     first of, outside brackets: `=`, `<`, `>`, `≤`, `≥`, `≠`, `≈`, `,`, `;`, `&`, `\\\\`;
     a relation, arrow or structure command (`\\le`, `\\approx`, `\\in`, `\\implies`, `\\to`,
     `\\quad`, `\\pmod`, `\\begin`, `\\end`, `\\tag`, ...); `\\text{...}` and its kin (so a unit
     or a word like `\\text{ or }` ends it); a closing bracket opened before the `=`; the end
     of the math. Everything in between is one expression: `2 \\cdot 24`, `\\frac{3}{4}`,
     `2^{10} \\times 3`, `1 \\pm \\sqrt{2}`. In align-like environments `&=` (and eqnarray's
     `&=&`) is an `=`; a line that starts with `&=` continues the chain of the line before,
     so the member that `\\\\` ended there is not the last.
   - In prose (everything else: GSM8K, CHAMP's plain-text math). Any `=` counts, except one
     inside a box or inside a sub- or superscript group (`sum_(i=1)^n`). A member is operands
     joined by binary operators. An operand is a run of non-space characters other than
     `, ; = < > ≤ ≥ ≠ ≈` and unbalanced closing brackets; a bracketed group `(...)`,
     `[...]`, `{...}` closed on the same line belongs to the operand even with spaces or
     commas inside (`C(10, 3)`); a comma between a digit and exactly three more digits is a
     thousands separator (`17,500`). The operators, spaced or not, are `+ - * / ^ × ÷ ·`,
     `\\cdot`, `\\times`, `\\div`, `\\pm`, `\\mp` and the word `mod`: `70 + 99 + 70` is one
     member, `12 inches` gives `12`. An `=` followed by a math span takes the span's first
     member (`5x = $20$` gives `20`).
   - GSM8K calculator annotations `<<48/2=24>>` are equations of their own (prose rules); they
     are blanked out before the rest is read, so `= <<6*2=12>>12 inches` also gives `12`.
3. Final-answer lines (`#### 42`, `The answer is ...`, `Final answer: ...`; found and cut at
   the end of their sentence by `dail.answers`): only the answer itself. If it starts with a
   math span, the span's content; otherwise it also ends at a clause break, a `,` or `;`
   followed by a space and a lowercase word other than `and`/`or` (`7, since ...` gives `7`).
   An answer that is an equation (`x = 5`) adds nothing: the equation pass already gave `5`.

Every value is then tidied: `$` (math delimiters, and GSM8K's currency sign; an escaped `\\$`
stays) and `\\(` `\\)` `\\[` `\\]` are removed; whitespace runs become one space; a leading
`\\displaystyle`, trailing `. , ; : ?`, trailing `\\,` `\\;` `\\!` `\\quad` and unbalanced closing
brackets are dropped; a value that is one whole box is unwrapped (`\\boxed{-2}` gives `-2`); a
trailing `\\text{...}` (or `\\mbox`, `\\textrm`) after a digit, a unit, is dropped; a value with no
letter, digit or backslash is dropped. Duplicates are then dropped by a key that also ignores
box commands, braces, spaces, `$` and `\\$`, `\\left`/`\\right`, thin spaces and thousands
separators, and reads `\\%` as `%` and `\\dfrac`/`\\tfrac` as `\\frac`. So `48`, `48$`, `48}$` and
`\\boxed{48}` are one landmark, and the form seen first is kept.

Known limits: an inline `$` opens math only when the next unescaped `$` closes it (no space
just inside either, no digit right after it, no blank line between); otherwise both are read
as currency. Juxtaposed prose operands are not joined (`sum_(i=1)^n i^3` gives
`sum_(i=1)^n`). `\\begin{cases}` and matrices are not split into members.

code: function signatures only (`def f(x):`, `function f(a, b)`, `fn f(x: i32) -> i32`).

proof: for solutions that are proofs (no checkable answer), the statements a reader could
check a derivation against, without the derivation. The text is cut into sentences (math
masked; a period after a bare heading such as `Lemma 1` or after `e.g.`, `i.e.`, `cf.` ends
nothing; a blank line, and a line that opens with a heading word or `#`, ends one). Kept, in
order of position, each once (whitespace-insensitive):
1. Claims: every sentence that opens with Lemma, Claim, Proposition, Theorem, Corollary or
   Observation (markdown `**`, `#` or `\\textbf{` before it allowed), every sentence that says
   "we (will / first / now / shall / need to / want to) show|prove|claim that" or "it suffices
   to show|prove", and the content of every lemma/claim/proposition/theorem/corollary
   environment.
2. Displayed equations: the content of every `$$...$$`, `\\[...\\]` and equation / align-like
   environment that is not inside a kept sentence (a claim that holds one already shows it).
3. The conclusion: the sentence that ends each proof, i.e. the last sentence before a QED mark
   (`∎`, `□`, `■`, `\\qed`, `\\blacksquare`, `\\square`, `\\Box`, `Q.E.D.`, `QED`, `\\end{proof}`,
   "this completes the proof", "the proof is complete") or holding it (the mark removed); and
   after the last mark (or in a text without one), the last sentence that opens with
   Therefore, Hence, Thus, Consequently, So, "We conclude", "In conclusion", "It follows
   that", else the last sentence.
4. Boxes (`\\boxed{}`): a proof that also names a result ("find all n, and prove ...").
Sentences are kept as written (math delimiters included, whitespace runs made one space,
markdown `**` / `__` / leading `#` removed); display contents lose their delimiters and
trailing punctuation. The paper gives no rule for proofs; these are ours.

regex:PATTERN: every match of a user pattern (group 1 if it has one), multiline.

An example may carry its own `landmarks` list, which overrides extraction (see `data.py`).
"""

from __future__ import annotations

import functools
import re

from dail.answers import BOX_OPEN, boxes, final_answers

__all__ = ["extract_landmarks", "check_kind", "KINDS"]

KINDS = ("math", "code", "proof", "regex:PATTERN")

_SIGNATURE = re.compile(
    r"^\s*(?:async\s+)?def\s+\w+\s*\([^)]*\)\s*(?:->\s*[^:]+)?:"
    r"|^\s*(?:export\s+)?(?:async\s+)?function\s*\*?\s*\w+\s*\([^)]*\)"
    r"|^\s*(?:pub(?:\([^)]*\))?\s+)?fn\s+\w+\s*(?:<[^>]*>)?\s*\([^)]*\)(?:\s*->\s*[^{]+)?",
    re.MULTILINE)

# ----------------------------------------------------------------------------- reading the text

_CALC = re.compile(r"<<([^<>]*?)>>")
_MATH_ENV = re.compile(r"\\begin\{((?:equation|align|alignat|flalign|gather|multline|eqnarray)\*?)\}")
_MASK = "\x01"  # stands for a math span in the prose view (never in real text)
_OPEN, _CLOSE = "([{", ")]}"


def _math_spans(text: str, skip: dict[int, int]) -> list[tuple[int, int, int, int]]:
    """(start, end, content start, content end) of every math span, left to right.

    `skip` maps a box's content start to its content end: a box met in prose is jumped over,
    so a `$` inside it opens nothing.
    """
    spans = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            m = BOX_OPEN.match(text, i)
            if m and m.end() in skip:
                i = skip[m.end()] + 1
                continue
            if text[i + 1:i + 2] in ("(", "["):
                close = "\\)" if text[i + 1] == "(" else "\\]"
                j = text.find(close, i + 2)
                if j >= 0:
                    spans.append((i, j + 2, i + 2, j))
                    i = j + 2
                    continue
            m = _MATH_ENV.match(text, i)
            if m:
                tag = f"\\end{{{m.group(1)}}}"
                j = text.find(tag, m.end())
                if j >= 0:
                    spans.append((i, j + len(tag), m.end(), j))
                    i = j + len(tag)
                    continue
            i += 2  # a command or escape: `\$` is a dollar sign and `\\[` is a line break, not math
            continue
        if c == "$":
            if text.startswith("$$", i):
                j = text.find("$$", i + 2)
                if j >= 0:
                    spans.append((i, j + 2, i + 2, j))
                    i = j + 2
                else:
                    i += 2
                continue
            j = _inline_close(text, i)
            if j is not None:
                spans.append((i, j + 1, i + 1, j))
                i = j + 1
                continue
        i += 1
    return spans


def _inline_close(text: str, i: int) -> int | None:
    """The `$` closing an inline span opened at `i`, or None when this `$` is a currency sign.

    The candidate is the next unescaped `$`. It closes only if no space sits just inside
    either `$`, no digit follows it and no blank line lies between: `$12.48 - $0.48` is money.
    """
    if i + 1 >= len(text) or text[i + 1].isspace():
        return None
    j = i + 1
    while True:
        j = text.find("$", j)
        if j < 0:
            return None
        if text[j - 1] != "\\":
            break
        j += 1
    if text[j - 1].isspace() or text[j + 1:j + 2].isdigit() or re.search(r"\n[ \t]*\n", text[i:j]):
        return None
    return j


def _bracket_pairs(s: str) -> dict[int, int]:
    """Index of each `(`, `[`, `{` -> index after its closing bracket, same kind, same line.

    One stack per kind, emptied at each line end, so an unclosed bracket pairs with nothing
    and the whole text costs one pass. Escaped characters (`\{`, `\}`) are not brackets.
    """
    pairs: dict[int, int] = {}
    stacks: dict[str, list[int]] = {c: [] for c in _OPEN}
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "\n":
            for st in stacks.values():
                st.clear()
        elif c in _OPEN:
            stacks[c].append(i)
        elif c in _CLOSE:
            st = stacks[_OPEN[_CLOSE.index(c)]]
            if st:
                pairs[st.pop()] = i + 1
        i += 1
    return pairs


def _skip(s: str, i: int, chars: str = " \t") -> int:
    """First index at or after `i` whose character is not in `chars`."""
    while i < len(s) and s[i] in chars:
        i += 1
    return i


# ----------------------------------------------------------------------------- prose members

_PROSE_STOP = set(",;=<>≤≥≠≈") | {_MASK}
_PROSE_OP = re.compile(r"[-+*/^×÷·]|\\(?:cdot|times|div|pm|mp)(?![a-zA-Z])|mod\b")
_PROSE_EQ = re.compile(r"(?<![<>!=:])=(?!=)")
_THOUSANDS = re.compile(r",\d{3}(?!\d)")


def _operand_end(s: str, i: int, pairs: dict[int, int]) -> int:
    """End of the operand starting at `i` (== i when there is none)."""
    j = i
    while j < len(s):
        c = s[j]
        if c in _OPEN:
            j = pairs.get(j, j + 1)  # a whole group, spaces and commas included; unclosed: just a character
            continue
        if c in _CLOSE or c.isspace() or c in _PROSE_STOP:
            if c == "," and j > i and s[j - 1].isdigit() and _THOUSANDS.match(s, j):
                j += 1  # thousands separator: 17,500
                continue
            break
        j += 2 if c == "\\" and j + 1 < len(s) else 1
    return j


def _prose_member_end(s: str, i: int, pairs: dict[int, int]) -> int:
    """End of the member starting at `i`: operands joined by binary operators."""
    end = i
    while True:
        j = _operand_end(s, i, pairs)
        if j == i:
            return end
        end = j
        m = _PROSE_OP.match(s, _skip(s, j))
        if not m:
            return end
        i = _skip(s, m.end())


def _prose_equations(prose: str, text: str, spans: dict[int, tuple[int, int]],
                     in_box: list[tuple[int, int]], offset: int = 0) -> list[tuple[int, str]]:
    """Right-hand sides of the `=` chains in `prose` (math spans masked, annotations blanked)."""
    out = []
    pairs = _bracket_pairs(prose)
    # Where an `=` is not an equation: inside a box (its content is taken whole), and inside a
    # sub- or superscript group, where it is an index: sum_(i=1)^n. Marked with a difference
    # array, so nested groups still cost one pass.
    covered = [0] * (len(prose) + 1)
    groups = [(m.start(), pairs[m.start() + 1]) for m in re.finditer(r"[_^][({]", prose) if m.start() + 1 in pairs]
    for a, b in [*in_box, *groups]:
        covered[a] += 1
        covered[b] -= 1
    depth, skip = 0, []
    for c in covered:
        depth += c
        skip.append(depth > 0)
    for m in _PROSE_EQ.finditer(prose):
        pos = m.start()
        if skip[pos]:
            continue
        k = _skip(prose, m.end())
        if prose.startswith(_MASK, k) and k in spans:  # `x = $\frac{3}{4}$`: the span's first member
            cs, ce = spans[k]
            i, j, last = _math_member(text, cs, ce)
            if last:
                out.append((offset + i, text[i:j]))
            continue
        j = _prose_member_end(prose, k, pairs)
        after = _skip(prose, j)
        if prose.startswith("=", after) and not prose.startswith("==", after):
            continue  # not the last member of the chain
        out.append((offset + k, prose[k:j]))
    return out


# ----------------------------------------------------------------------------- math members

# Commands that end a member: relations, arrows, text, spacing between clauses, structure.
_MATH_STOP = {
    "le", "leq", "ge", "geq", "lt", "gt", "ne", "neq", "leqslant", "geqslant", "ll", "gg",
    "approx", "equiv", "sim", "simeq", "cong", "propto", "in", "notin", "subset", "subseteq",
    "supset", "supseteq", "mid", "nmid", "implies", "impliedby", "iff", "Rightarrow", "Leftarrow",
    "Leftrightarrow", "Longrightarrow", "Longleftarrow", "Longleftrightarrow", "rightarrow",
    "longrightarrow", "to", "gets", "mapsto", "therefore", "because", "quad", "qquad", "text",
    "textbf", "textit", "textrm", "mbox", "hbox", "intertext", "pmod", "begin", "end", "label",
    "tag", "notag", "nonumber", "hline", "cr",
}
_CMD = re.compile(r"\\(?:[a-zA-Z]+|.)", re.DOTALL)
# What may sit between a member and the `=` that continues its chain (align: `\\ &=`).
_CONTINUE = re.compile(r"(?:\s|&|\\\\(?:\[[^\]]*\])?|\\(?:notag|nonumber)(?![a-zA-Z]))*")


def _math_member(s: str, i: int, end: int) -> tuple[int, int, bool]:
    """(start, end, is-last-of-its-chain) of the member after position `i` (eqnarray's `&=&` included)."""
    while i < end and (s[i].isspace() or s[i] == "&"):
        i += 1
    depth, j = 0, i
    while j < end:
        c = s[j]
        if c == "\\":
            m = _CMD.match(s, j, end)
            if m is None:  # a lone backslash at the end
                break
            name = m.group(0)[1:]
            if depth == 0 and (name in _MATH_STOP or name == "\\"):
                break
            if name in ("{", "}"):  # \{ \} group like brackets: `\{1, 2\}` is one member
                depth += 1 if name == "{" else -1
                if depth < 0:
                    break
            j = m.end()
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth < 0:  # the closing bracket of a group the `=` sits in: `(x = 3)`
                break
        elif depth == 0 and c in "=<>,;&≤≥≠≈":
            break
        j += 1
    k = _CONTINUE.match(s, j, end).end()
    last = not (k < end and s[k] == "=" and s[k + 1:k + 2] != "=")
    return i, j, last


def _math_equals(s: str, start: int, end: int) -> list[int]:
    """Positions of the `=` in s[start:end] that sit outside every bracket."""
    out, depth, j = [], 0, start
    while j < end:
        c = s[j]
        if c == "\\":
            m = _CMD.match(s, j, end)
            name = m.group(0) if m else c
            depth += (name == "\\{") - (name == "\\}")
            j += len(name)
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c == "=" and depth == 0 and s[j - 1:j] not in ("<", ">", "!", "=", ":") and s[j + 1:j + 2] != "=":
            out.append(j)
        j += 1
    return out


def _math_equations(text: str, start: int, end: int) -> list[tuple[int, str]]:
    """(position, member) of every chain's last member in the math text[start:end]."""
    out = []
    for pos in _math_equals(text, start, end):
        i, j, last = _math_member(text, pos + 1, end)
        if last:
            out.append((i, text[i:j]))
    return out


# ----------------------------------------------------------------------------- values

_WRAPPED_BOX = re.compile(r"^\\(?:boxed|fbox)\s*\{(.*)\}$", re.DOTALL)
_UNIT = re.compile(r"^(.*\d)\s*\\(?:text|mbox|textrm)\s*\{[^{}]*\}$", re.DOTALL)
_CLAUSE = re.compile(r"[,;]\s+(?!and\b|or\b)[a-z]")
_LEADING_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _tidy(value: str) -> str:
    """The displayed form of a landmark: no math delimiters, no trailing punctuation or unit."""
    v = re.sub(r"(?<!\\)\$|(?<!\\)\\[()\[\]]", "", value)
    v = re.sub(r"\s+", " ", v).strip()
    v = re.sub(r"^\\displaystyle\b\s*", "", v)
    while True:
        before = v
        v = re.sub(r"(?:[.,;:?]|\\[,;!]|\\q?quad\b)+$", "", v).strip()  # sentence punctuation, spacing
        for open_, close in zip(_OPEN, _CLOSE):  # an unbalanced closer from the text around: "(x = 3)"
            while v.endswith(close) and v.count(close) > v.count(open_):
                v = v[:-1].rstrip()
        m = _WRAPPED_BOX.match(v)
        if m and _balanced(m.group(1)):
            v = m.group(1).strip()
        m = _UNIT.match(v)
        if m:
            v = m.group(1).strip()
        if v == before:
            break
    if not (any(ch.isalnum() for ch in v) or "\\" in v):
        return ""
    return v


def _balanced(s: str) -> bool:
    """Whether the braces of `s` pair up (so `\\boxed{a} + \\boxed{b}` is not one box to unwrap)."""
    depth = 0
    for name in re.findall(r"\\.|[{}]", s):
        depth += (name == "{") - (name == "}")
        if depth < 0:
            return False
    return depth == 0


def _key(value: str) -> str:
    """Dedup key: ignores boxes, delimiters, braces, spaces, sizing and thin spaces."""
    k = re.sub(r"\\(?:boxed|fbox)(?![a-zA-Z])", "", value)
    k = re.sub(r"\\(?:d|t)frac(?![a-zA-Z])", r"\\frac", k)
    k = re.sub(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[,;!:]", "", k)
    k = re.sub(r"\\?\$|\\[()\[\]]|[{}\s]", "", k)
    k = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", k)  # thousands separators: 17,500 is 17500
    return re.sub(r"[.,;:?]+$", "", k.replace("\\%", "%"))


def _final_value(answer: str) -> str:
    """The answer of a final-answer line, as a landmark ("" when it adds nothing)."""
    m = _LEADING_MATH.match(answer)
    if m:
        answer = next(g for g in m.groups() if g is not None)
    else:
        c = _CLAUSE.search(answer)
        if c:
            answer = answer[:c.start()]
    value = _tidy(answer)
    return "" if _math_equals(value, 0, len(value)) else value


# ----------------------------------------------------------------------------- extractors

def _math(solution: str) -> list[tuple[int, str]]:
    """(position, raw value) of every box, equation right-hand side and final answer."""
    found, in_box, outer_end = [], [], -1
    for b in boxes(solution):  # in order of their start
        if b.start < outer_end:
            continue  # a box inside a box: the outer content already holds it
        outer_end = b.end
        in_box.append((b.start, b.end))
        found.append((b.start, b.answer))
    # Calculator annotations are equations of their own; blank them so the rest reads
    # `... = 12 inches` rather than `... = <<6*2=12>>12 inches` (positions stay aligned).
    for m in _CALC.finditer(solution):
        inner_text = m.group(1)
        found += _prose_equations(inner_text, inner_text, {}, [], offset=m.start(1))
    text = _CALC.sub(lambda m: " " * len(m.group(0)), solution)
    spans = _math_spans(text, dict(in_box))
    # The prose view: the same text with every math span masked, so prose members stop at math
    # and never see a delimiter, while positions still line up with `text`.
    prose = list(text)
    for start, end, _, _ in spans:
        prose[start:end] = _MASK * (end - start)
    prose = "".join(prose)
    found += _prose_equations(prose, text, {start: (cs, ce) for start, _, cs, ce in spans}, in_box)
    for _, _, cs, ce in spans:
        found += _math_equations(text, cs, ce)
    for f in final_answers(solution):
        if f.answer:
            found.append((f.start, _final_value(f.answer)))
    return found


# ----------------------------------------------------------------------------- proofs

_CLAIM_WORDS = r"lemma|claim|proposition|theorem|corollary|observation"
_HEADING_WORDS = _CLAIM_WORDS + r"|proof|case|step|solution|part|remark|note|fact|definition"
_MARKUP = r"[ \t*_#]*(?:\\textbf\{)?"
_QED_COMMAND = r"\\(?:qed|blacksquare|square|Box|qedsymbol)(?![a-zA-Z])"
# Where a sentence ends: a blank line; a line break before a heading or `#`; `.`, `!`, `?` (plus
# closing markup or brackets) before whitespace; a QED mark (math spans that hold only a QED
# command are left unmasked for this).
_BREAK = re.compile(rf"(?P<blank>\n[ \t]*\n)|(?P<line>\n(?=[ \t]*(?:#|[*_]*(?:{_HEADING_WORDS})\b)))"
                    r"|(?P<stop>[.!?][*_)\]\"']*(?=\s))"
                    rf"|(?P<qed>\\end\{{proof\}}|∎|□|■|\$+{_QED_COMMAND}\$+|\\\({_QED_COMMAND}\\\))",
                    re.IGNORECASE)
# A sentence so far that is only a heading ("Lemma 1", "**Claim 2 (key)", "Proof", "Case 2.1"): its
# period ends nothing. The label is a number, a roman numeral or a letter, so "Note that x." still ends.
_HEADING_ONLY = re.compile(rf"^\s*{_MARKUP}(?:{_HEADING_WORDS})(?:\s+(?:\d+(?:\.\d+)*|[IVX]+|[A-Za-z]))?"
                           r"\s*(?:\([^()\n]{0,40}\))?[*_}]*$", re.IGNORECASE)
_ABBREV = re.compile(r"(?:^|[\s(])(?:e\.g|i\.e|etc|cf|resp|vs|viz|eq|eqs|fig|thm|lem|prop|no)$", re.IGNORECASE)
_CLAIM = re.compile(rf"^{_MARKUP}(?:{_CLAIM_WORDS})\b"
                    r"|\b(?:we|i)\s+(?:will\s+|first\s+|now\s+|shall\s+|need\s+to\s+|want\s+to\s+|must\s+)?"
                    r"(?:show|prove|claim)\s+that\b|\bit\s+suffices\s+to\s+(?:show|prove)\b", re.IGNORECASE)
_CLAIM_ENV = re.compile(rf"\\begin\{{({_CLAIM_WORDS})\*?\}}(?:\[[^\]\n]*\])?(.*?)\\end\{{\1\*?\}}",
                        re.IGNORECASE | re.DOTALL)
_QED_MARK = re.compile(rf"(?:\$*{_QED_COMMAND}\$*|∎|□|■|\\end\{{proof\}}"
                       r"|\bQ\.\s?E\.\s?D\b\.?|\bQED\b\.?)[\s.$]*$")
_QED_SENTENCE = re.compile(r"^\W*(?:this|which)\s+(?:completes|concludes|finishes)\s+the\s+proof\b"
                           r"|^\W*the\s+proof\s+is\s+(?:complete|finished)\b", re.IGNORECASE)
_CONCLUDING = re.compile(rf"^{_MARKUP}(?:therefore|hence|thus|consequently|so|we\s+conclude|in\s+conclusion"
                         r"|it\s+follows\s+that)\b", re.IGNORECASE)


def _sentences(text: str, masked: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence with content; `masked` is `text` with math spans blanked,
    so a period inside math ends nothing."""
    out, start = [], 0
    for m in _BREAK.finditer(masked):
        if m.group("stop"):
            before = masked[start:m.start()]
            if _HEADING_ONLY.match(before) or _ABBREV.search(before):
                continue
            end = m.end()
        elif m.group("qed"):
            end = m.end()
        else:
            end = m.start()
        out.append((start, end))
        start = end
    out.append((start, len(text)))
    spans = []
    for a, b in out:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            spans.append((a, b))
    return spans


def _sentence_value(s: str) -> str:
    """A kept sentence as shown: markdown emphasis and a leading `#` removed, whitespace runs made one space."""
    s = re.sub(r"\*\*|__", "", s)
    s = re.sub(r"^(?:#+|\\begin\{proof\}(?:\[[^\]\n]*\])?)\s*", "", s.strip())
    return re.sub(r"\s+", " ", s).strip()


def _without_qed(s: str) -> str:
    """The sentence with a trailing QED mark removed ("" when it was only the mark, or says the
    proof is complete)."""
    if _QED_SENTENCE.match(s):
        return ""
    rest = _QED_MARK.sub("", s).strip()
    return rest if re.search(r"[A-Za-z0-9\\]", rest) else ""


def _proof(solution: str) -> list[tuple[int, str]]:
    """(position, value) of every claim, displayed equation, conclusion and box of a proof."""
    in_box = {b.start: b.end for b in boxes(solution)}
    spans = _math_spans(solution, in_box)
    masked = list(solution)
    for start, end, cs, ce in spans:
        if re.fullmatch(rf"\s*{_QED_COMMAND}\s*", solution[cs:ce]):
            continue  # `$\\blacksquare$`: a QED mark, which ends its sentence
        masked[start:end] = _MASK * (end - start)
        # A display that ends its sentence ("... gives $$x = 1.$$" or one followed by a line that
        # opens with a capital letter) ends it in the masked view too.
        if solution.startswith(("$$", "\\[", "\\begin"), start) and (
                solution[cs:ce].rstrip().endswith((".", "!", "?"))
                or re.match(r"[ \t]*\n[ \t]*[A-Z]", solution[end:])):
            masked[end - 1] = "."
    sentences = _sentences(solution, "".join(masked))
    envs = [(m.start(), m.end(), m.start(2), m.group(2)) for m in _CLAIM_ENV.finditer(solution)]

    kept: list[tuple[int, int, str]] = []  # (start, end, value) of the sentences kept whole
    for a, b in sentences:
        if any(ea <= a < eb for ea, eb, _, _ in envs):
            continue  # inside a lemma environment: the environment is the claim
        if _CLAIM.search(solution[a:b]):
            kept.append((a, b, _sentence_value(solution[a:b])))
    for ea, eb, cs, content in envs:
        kept.append((cs, eb, _sentence_value(content)))

    # Conclusions: the sentence that ends each proof (before or holding its QED mark), and after
    # the last mark the last concluding sentence (else the last sentence).
    last_qed = -1
    for k, (a, b) in enumerate(sentences):
        text = solution[a:b]
        if not (_QED_MARK.search(text) or _QED_SENTENCE.match(text)):
            continue
        last_qed = k
        rest = _without_qed(text)
        if rest:
            kept.append((a, b, _sentence_value(_QED_MARK.sub("", text))))
            continue
        for pa, pb in reversed(sentences[:k]):
            if _without_qed(solution[pa:pb]):
                kept.append((pa, pb, _sentence_value(solution[pa:pb])))
                break
    tail = [(a, b) for a, b in sentences[last_qed + 1:] if _without_qed(solution[a:b])]
    if tail:
        concluding = [(a, b) for a, b in tail if _CONCLUDING.match(solution[a:b])]
        a, b = (concluding or tail)[-1]
        kept.append((a, b, _sentence_value(solution[a:b])))

    found = [(a, v) for a, _, v in kept]
    covered = [(a, b) for a, b, _ in kept]
    for start, end, cs, ce in spans:
        display = solution.startswith(("$$", "\\[", "\\begin"), start)
        if display and not any(a <= start and end <= b for a, b in covered):
            value = re.sub(r"\s+", " ", solution[cs:ce]).strip()
            found.append((start, re.sub(r"(?:[.,;:]|\\\\)+$", "", value).strip()))
    for b_start, b_end in in_box.items():
        if not any(a <= b_start < b for a, b in covered):
            found.append((b_start, solution[b_start:b_end].strip()))
    return found


def _code(solution: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(0).strip()) for m in _SIGNATURE.finditer(solution)]


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.MULTILINE)


def check_kind(kind: str) -> None:
    """Raise ValueError, saying what is expected, unless `kind` is math, code, proof or regex:PATTERN."""
    if not isinstance(kind, str):
        raise ValueError(f"landmark extractor must be a string, one of {', '.join(KINDS)}; got {kind!r}")
    if kind in ("math", "code", "proof"):
        return
    if kind.startswith("regex:"):
        pattern = kind[len("regex:"):]
        if not pattern:
            raise ValueError("landmark extractor 'regex:' has an empty pattern; write regex:PATTERN, "
                             r"e.g. regex:=\s*(\d+)")
        try:
            _compile(pattern)
        except re.error as e:
            raise ValueError(f"landmark extractor '{kind}': invalid regular expression ({e})") from None
        return
    raise ValueError(f"unknown landmark extractor '{kind}'; expected one of {', '.join(KINDS)}")


def extract_landmarks(solution: str, kind: str = "math") -> list[str]:
    """Coarse results of `solution`, in order, without duplicates. `kind`: math|code|proof|regex:PATTERN."""
    check_kind(kind)
    if kind == "math":
        found = [(pos, _tidy(v)) for pos, v in _math(solution)]
    elif kind == "code":
        found = _code(solution)
    elif kind == "proof":
        found = _proof(solution)
    else:
        rx = _compile(kind[len("regex:"):])
        found = [(m.start(), ((m.group(1) if rx.groups else m.group(0)) or "").strip())
                 for m in rx.finditer(solution)]
    seen, out = set(), []
    for _, value in sorted(found, key=lambda t: t[0]):  # stable: ties keep source order
        key = _key(value) if kind == "math" else re.sub(r"\s+", "", value) if kind == "proof" else value
        if value and key not in seen:
            seen.add(key)
            out.append(value)
    return out
