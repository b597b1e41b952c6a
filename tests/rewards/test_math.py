"""GSM8K, boxed-math and Geometry3K checkers on hand-written cases (verl semantics)."""

import pytest

from verl_mega.rewards import (
    RuleBasedReward,
    extract_gsm8k_answer,
    geo3k_compute_score,
    gsm8k_compute_score,
    is_equiv,
    last_boxed_only_string,
    math_compute_score,
    normalize_final_answer,
    remove_boxed,
)


def test_extract_gsm8k_strict_and_flexible():
    text = "She pays 3 * $400 = $1,200.\n#### 5\nWait, actually\n#### $1,200"
    assert extract_gsm8k_answer(text) == "1200"  # last marker, `$` and commas stripped
    assert extract_gsm8k_answer("The answer is 42.") is None
    assert extract_gsm8k_answer("The answer is 42.", "flexible") == "42"
    assert extract_gsm8k_answer("from 3 to -7.5 ...", "flexible") == "-7.5"
    assert extract_gsm8k_answer("no digits", "flexible") is None
    with pytest.raises(ValueError, match="method"):
        extract_gsm8k_answer("#### 1", "loose")


def test_gsm8k_score():
    assert gsm8k_compute_score("so #### 72", "72") == 1.0
    assert gsm8k_compute_score("so #### 72.0", "72") == 1.0
    assert gsm8k_compute_score("so #### 71", "72", format_score=0.1) == 0.1
    assert gsm8k_compute_score("so 72", "72", format_score=0.1) == 0.0  # strict: no marker
    assert gsm8k_compute_score("so 72", "72", method="flexible") == 1.0
    assert gsm8k_compute_score("#### 1,000", "1000", score=2.0) == 2.0


def test_boxed_extraction():
    s = r"first \boxed{1} then \boxed{\frac{1}{2}} done"
    assert last_boxed_only_string(s) == r"\boxed{\frac{1}{2}}"
    assert remove_boxed(last_boxed_only_string(s)) == r"\frac{1}{2}"
    assert last_boxed_only_string(r"answer $\boxed 7$.") == r"\boxed 7"
    assert remove_boxed(r"\boxed 7") == "7"
    assert last_boxed_only_string(r"\fbox{x+1}") == r"\fbox{x+1}"
    assert last_boxed_only_string(r"\boxed{unclosed") is None
    assert last_boxed_only_string("no box") is None
    with pytest.raises(ValueError):
        remove_boxed("7")


@pytest.mark.parametrize(
    "a,b",
    [
        (r"\frac12", r"\frac{1}{2}"),
        ("0.5", r"\dfrac{1}{2}"),
        ("1/2", r"\frac{1}{2}"),
        (r"x = 3", "3"),
        (r"10 \text{ cm}", "10"),
        (r"90^\circ", "90"),
        ("1,000", "1000"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\$5.00", "5"),
        (r"\text{(A)}", "(A)"),
    ],
)
def test_equivalent(a, b):
    assert is_equiv(a, b), (normalize_final_answer(a), normalize_final_answer(b))


@pytest.mark.parametrize("a,b", [("1/3", "0.33"), ("(1,2)", "(2,1)"), (r"\sqrt{8}", "3"), ("x+1", "x-1")])
def test_not_equivalent(a, b):
    assert not is_equiv(a, b)
    assert not is_equiv(None, b)


def test_math_score():
    assert math_compute_score(r"... so the answer is $\boxed{\dfrac{3}{4}}$.", "3/4") == 1.0
    assert math_compute_score(r"... $\boxed{0.75}$", r"The answer is \boxed{\frac34}") == 1.0
    assert math_compute_score(r"... $\boxed{5}$", "6") == 0.0
    assert math_compute_score("the answer is 5", "5") == 0.0  # not boxed


def test_geo3k_score_and_rule_dispatch():
    # verl's geo3k.compute_score: 0.9 * boxed accuracy + 0.1 * format (<think>...</think> then a boxed answer)
    assert geo3k_compute_score(r"<think>angles sum to 180</think> so x = \boxed{30}", "30") == pytest.approx(1.0)
    assert geo3k_compute_score(r"x = \boxed{30}", "30") == pytest.approx(0.9)  # right, no <think>
    assert geo3k_compute_score(r"<think>hm</think> \boxed{31}", "30") == pytest.approx(0.1)  # formatted, wrong
    assert geo3k_compute_score("<think>hm</think> 30", "30") == 0.0  # not boxed
    # the data_source verl's geo3k preprocessing writes is known to trainer.reward=rule
    RuleBasedReward().check_data_sources(["hiyouga/geometry3k"])
    assert RuleBasedReward()("hiyouga/geometry3k", r"\boxed{2\sqrt{3}}", r"2\sqrt{3}") == pytest.approx(0.9)
