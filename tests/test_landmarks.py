"""Landmark extraction on real GSM-symbolic and CHAMP solutions, and the rules one by one."""

from __future__ import annotations

import pytest

from dail.config import DataConfig
from dail.data import load_examples
from dail.landmarks import extract_landmarks


def test_gsm_calculator_annotations_are_equations():
    s = ("The total number of plates from Maya and her husband was 35+3=<<35+3=38>>38 plates.\n"
         "Since the husband bought a package of 14 plates, then Maya's package contained "
         "38-14=<<38-14=24>>24 plates.\n#### 24")
    assert extract_landmarks(s) == ["38", "24"]


def test_chain_keeps_only_last_member_and_order():
    s = "Thus there are x_6+y_6+z_6=70+99+70=239 such strings. So a = 3 and b = 4."
    assert extract_landmarks(s) == ["239", "3", "4"]


def test_boxed_balanced_and_final_answer_line():
    s = "We get \\boxed{\\frac{1}{2}}. Then y = 2x + 1. The answer is 7."
    assert extract_landmarks(s) == ["\\frac{1}{2}", "2x + 1", "7"]


def test_duplicates_dropped_keep_first_position():
    assert extract_landmarks("a = 5, so b = 5. #### 5") == ["5"]


def test_code_and_regex_extractors():
    code = "def f(x, y):\n    return x + y\n\nfn g(a: i32) -> i32 { a }\n"
    assert extract_landmarks(code, "code") == ["def f(x, y):", "fn g(a: i32) -> i32"]
    assert extract_landmarks("step 12, then 13", r"regex:(\d+)") == ["12", "13"]
    with pytest.raises(ValueError, match="unknown landmark extractor"):
        extract_landmarks("x", "nope")


def test_real_gsm_symbolic_solutions():
    for ex in load_examples(DataConfig(source="gsm-symbolic", limit=10)):
        marks = extract_landmarks(ex.solution)
        assert marks, ex.solution
        assert ex.answer in marks  # the #### line (or an equation) yields the gold answer
        assert not any("<<" in m or ">>" in m for m in marks)


def test_real_champ_solutions():
    exs = {e.id: e for e in load_examples(DataConfig(source="champ", split="train"))}
    # "For 1324 people, we have 2^m=1024, k=300. Thus, the last person left is 300*2+1=601."
    assert extract_landmarks(exs["P_Sequence_42"].solution) == ["1024", "300", "601"]
    with_marks = 0
    for ex in list(exs.values())[:40]:
        marks = extract_landmarks(ex.solution)
        with_marks += bool(marks)
        assert len(marks) == len(set(marks))
        assert all(m.replace(" ", "") in ex.solution.replace(" ", "") for m in marks)  # extracted, not invented
    assert with_marks >= 30
