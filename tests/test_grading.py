"""Grading: extraction rules, a table of tricky equivalences, timeouts, threads, multiple choice."""

from __future__ import annotations

import threading
import time

import pytest

from dail.answers import boxes, final_answers
from dail.grading import _POOL, extract_answer, extract_choice, grade_many
from dail.prompts import choice_problem
from dail.landmarks import extract_landmarks

# (model text, gold, expected)
MATH_CASES = [
    # fractions, decimals, LaTeX forms
    ("so \\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True),
    ("\\boxed{0.75}", "3/4", True),
    ("\\boxed{\\sqrt{2}}", "2^{1/2}", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    # equations and variables
    ("\\boxed{x = 5}", "5", True),
    ("The answer is x=5.", "5", True),
    ("\\boxed{6}", "5", False),
    # thousands separators
    ("\\boxed{1,000}", "1000", True),
    ("#### 1,000", "1000", True),
    ("\\boxed{12{,}500}", "12500", True),
    ("\\boxed{1000}", "1,000", True),
    # percent
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{25\\%}", "50", False),
    # negative numbers
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{3}", "-3", False),
    ("The answer is -7", "-7", True),
    # money and text
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{18.00}", "18", True),
    ("\\boxed{\\text{Paris}}", "Paris", True),
    # boxed vs final line, which one counts
    ("First 3+4=7, so \\boxed{7}. Final answer: 8", "7", True),   # boxed wins
    ("We get 7.\n#### 7", "7", True),
    ("So the final answer is $\\frac{3}{2}$.", "1.5", True),
    ("Final answer: **12**", "12", True),
    ("The answer is 7. Let me write the final answer neatly", "7", True),  # a mention is not an answer line
    ("The final answer is 7", "7", True),
    ("The answer is 12.\nWait, let me recheck. The answer is 13.", "12", False),  # last line counts
    ("\\boxed{3} then later \\boxed{4}", "4", True),                               # last boxed counts
    # no answer at all, or an unclosed box
    ("I think it is 7", "7", False),
    ("\\boxed{7", "7", False),
    ("", "7", False),
    # wrong answers
    ("\\boxed{42}", "24", False),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("\\boxed{x=6}", "5", False),
]


@pytest.mark.parametrize("text,gold,expected", MATH_CASES)
def test_math_table(text, gold, expected):
    assert grade_many([text], [gold], timeout=10.0) == [expected]


def test_batch_equals_one_by_one():
    texts = [t for t, _, _ in MATH_CASES]
    golds = [g for _, g, _ in MATH_CASES]
    assert grade_many(texts, golds, timeout=10.0) == [e for _, _, e in MATH_CASES]


def test_extraction_spans():
    text = "We add: 3+4=7. So \\boxed{7} is it."
    ex = extract_answer(text)
    assert ex.answer == "7" and text[ex.start:ex.end] == "7" and ex.start == text.index("{7}") + 1
    text = "Work.\nThe answer is $12$."
    ex = extract_answer(text)
    assert ex.answer == "12" and text[ex.start:ex.end] == "12"
    assert extract_answer("\\boxed{a{b}c}").answer == "a{b}c"
    assert extract_answer("nothing here") is None


def test_shared_parser_boxes():
    """dail.answers.boxes: every box in order (nested ones too), balanced, escapes skipped."""
    text = "\\boxed{a} \\fbox {b{c}} \\boxed{\\{x\\}} \\boxed{outer \\boxed{inner}} \\boxed{open"
    found = boxes(text)
    assert [b.answer for b in found] == ["a", "b{c}", "\\{x\\}", "outer \\boxed{inner}", "inner"]
    assert all(text[b.start:b.end] == b.answer for b in found)
    assert extract_answer(text).answer == "inner"  # grading takes the last closed box


def test_shared_parser_final_lines():
    text = "The answer is 12.\nWait. Final answer: **13**. Done\n#### 14 apples"
    assert [f.answer for f in final_answers(text)] == ["12", "13", "14 apples"]
    assert extract_answer(text).answer == "14 apples"
    # An empty last line is kept, so grading reports no answer instead of falling back to 12.
    assert final_answers("The answer is 12.\nThe answer is .")[-1].answer == ""
    assert extract_answer("The answer is 12.\nThe answer is .") is None


def test_grading_and_landmarks_read_the_same_answer():
    for text in ["So \\boxed{\\frac{1}{2}} it is.", "The answer is 7. Let me write it neatly.",
                 "#### 1,000", "Final answer: $\\frac{3}{2}$"]:
        assert extract_answer(text).answer in extract_landmarks(text), text


def test_many_unclosed_boxes_cost_linear_time():
    """A model stuck in a loop can write thousands of `\\boxed{`; extraction must stay fast."""
    text = "\\boxed{" * 30000 + "\\boxed{5}"
    t = time.monotonic()
    assert extract_answer(text).answer == "5"
    assert time.monotonic() - t < 2.0


def test_adversarial_answer_times_out_and_pool_recovers():
    """9^(9^(9^9)) never finishes in sympy (measured); it must cost ~timeout and count wrong."""
    grade_many(["\\boxed{1}"], ["2"], timeout=10.0)  # start the pool outside the timing
    before = _POOL.replaced
    texts = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{1}{2}}", "\\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
             "\\boxed{0.5}"]
    t = time.monotonic()
    out = grade_many(texts, ["5", "0.5", "2", "1/2"], timeout=1.0)
    elapsed = time.monotonic() - t
    assert out[0] is False and out[1] is True and out[2] is False and out[3] is True
    assert elapsed < 6.0
    assert _POOL.replaced >= before + 1
    # the pool still works afterwards
    assert grade_many(["\\boxed{0.5}"], ["1/2"], timeout=10.0) == [True]


def test_works_off_the_main_thread():
    out: list = []
    errors: list = []

    def run():
        try:
            out.extend(grade_many(["\\boxed{\\frac{1}{2}}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{3}"],
                                  ["0.5", "1", "4"], timeout=1.0))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not errors
    assert out == [True, False, False] * 2


def test_length_mismatch_and_unknown_kind():
    with pytest.raises(ValueError, match="golds"):
        grade_many(["a"], [], timeout=1.0)
    with pytest.raises(ValueError, match="kind"):
        grade_many(["a"], ["a"], timeout=1.0, kind="code")


# ----------------------------------------------------------------------------- multiple choice

def test_choice_problem_shuffles_with_seed_and_tracks_gold():
    options = ["right", "wrong1", "wrong2", "wrong3"]
    golds = set()
    for seed in range(20):
        text, gold = choice_problem("Q?", options, correct=0, seed=seed)
        assert f"{gold}) right" in text
        assert choice_problem("Q?", options, correct=0, seed=seed) == (text, gold)  # deterministic
        golds.add(gold)
    assert len(golds) > 1  # the correct option moves around


CHOICE_CASES = [
    ("Thinking... \\boxed{C}", "C", True),
    ("\\boxed{(B)}", "B", True),
    ("\\boxed{\\text{D}}", "D", True),
    ("The answer is (A).", "A", True),
    ("Answer: B", "B", True),
    ("Final answer: C) 42", "C", True),
    ("\\boxed{B}", "C", False),
    ("I am not sure", "A", False),
    ("\\boxed{Banana}", "B", False),
]


@pytest.mark.parametrize("text,gold,expected", CHOICE_CASES)
def test_choice_table(text, gold, expected):
    assert grade_many([text], [gold], timeout=1.0, kind="choice") == [expected]


def test_extract_choice():
    assert extract_choice("\\boxed{A}") == "A"
    assert extract_choice("no letter") is None
