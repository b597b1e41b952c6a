"""Rule-based answer checkers for math: GSM8K (`#### <number>`), boxed answers (MATH) and Geometry3K.

Reference: verl's `verl/utils/reward_score/gsm8k.py` (strict/flexible extraction, exact match),
`math.py` / `math_dapo.py` (Hendrycks' `last_boxed_only_string`, `remove_boxed`, `strip_string`;
Minerva-style `normalize_final_answer`) and `geo3k.py` (boxed accuracy plus a `<think>` format bonus; verl
grades with mathruler's `grade_answer`, here with the boxed-math equivalence below).

Simplifications: the normaliser is a light union of verl's two (LaTeX spacing, `\\left`/`\\right`,
`\\text{}` units, `\\frac12`, `a/b`, `x = ` prefixes, thousands commas), plus a numeric comparison
(ints, decimals, simple fractions) so `0.5`, `1/2` and `\\frac{1}{2}` agree. No symbolic (sympy)
equivalence: `2\\sqrt{2}` and `\\sqrt{8}` are different answers here.
"""

from __future__ import annotations

import math
import re

# Long responses: the answer is at the end, and regexes on huge strings are slow (verl clips too).
_GSM8K_CLIP_CHARS = 300
_STRICT = re.compile(r"#### \$?(-?[0-9.,]+)")
_NUMBER = re.compile(r"-?[0-9.,]*[0-9]")


def _clean_number(s: str) -> str:
    """`$1,234.` -> `1234`: drop `$`, thousands commas and a trailing full stop."""
    return s.replace(",", "").replace("$", "").rstrip(".")


def extract_gsm8k_answer(text: str, method: str = "strict") -> str | None:
    """The final numeric answer of a GSM8K-style solution, or None.

    strict: the number after the last `#### ` marker. flexible: the last number in the text.
    Commas and `$` are stripped (`#### $1,000` -> `1000`).
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"method must be 'strict' or 'flexible', got {method!r}")
    text = text[-_GSM8K_CLIP_CHARS:]
    found = _STRICT.findall(text) if method == "strict" else _NUMBER.findall(text)
    for candidate in reversed(found):
        cleaned = _clean_number(candidate)
        if cleaned not in ("", "-", "."):
            return cleaned
    return None


def _numbers_equal(a: str, b: str) -> bool:
    x, y = _to_number(a), _to_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def gsm8k_compute_score(
    solution_str: str, ground_truth: str, method: str = "strict", format_score: float = 0.0, score: float = 1.0
) -> float:
    """`score` if the extracted answer equals `ground_truth`, `format_score` if an answer was found but
    is wrong, 0 if none was found (verl's gsm8k semantics). `18`, `18.0` and `18.` all match `18`."""
    answer = extract_gsm8k_answer(solution_str, method)
    if answer is None:
        return 0.0
    truth = _clean_number(str(ground_truth).strip())
    return score if answer == truth or _numbers_equal(answer, truth) else format_score


# ---------------------------------------------------------------- boxed answers (MATH)


def last_boxed_only_string(text: str) -> str | None:
    """The last `\\boxed{...}` (braces balanced), `\\boxed x` or `\\fbox{...}` in `text`, or None."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    if text.startswith("\\boxed ", idx):
        return "\\boxed " + text[idx + len("\\boxed ") :].split("$")[0].strip()
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx : i + 1]
    return None


def remove_boxed(boxed: str) -> str:
    """`\\boxed{x}` / `\\fbox{x}` / `\\boxed x` -> `x`."""
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed ") :]
    for left in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(left) and boxed.endswith("}"):
            return boxed[len(left) : -1]
    raise ValueError(f"not a boxed expression: {boxed!r}")


_REMOVED = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ", "\\displaystyle"]


def _fix_fracs_and_sqrt(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_final_answer(answer: str) -> str:
    """A canonical string for a final math answer (light version of verl's `strip_string`)."""
    s = answer.strip().replace("\n", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\mbox", "\\text")
    for token in _REMOVED:
        s = s.replace(token, "")
    s = re.sub(r"\\text\{\s+[^{}]*\}$", "", s)  # trailing units: `10 \text{ cm}`
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", s)
    if len(parts := s.split("=")) == 2 and len(parts[0].strip()) <= 2:  # `x = 3` -> `3`
        s = parts[1]
    s = _fix_fracs_and_sqrt(s.replace(" ", "")).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    if s.startswith("."):
        s = "0" + s
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s


def _to_number(s: str) -> float | None:
    """A float for `3`, `-2.50`, `1,000`, `3/4`, `\\frac{3}{4}`, `-\\frac{3}{4}`; None otherwise."""
    s = s.replace(",", "")
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?)(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            value = float(m.group(2)) / float(m.group(3))
            return -value if m.group(1) else value
        return float(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def is_equiv(a: str | None, b: str | None) -> bool:
    """Whether two final answers agree after `normalize_final_answer` (or as numbers)."""
    if a is None or b is None:
        return False
    na, nb = normalize_final_answer(a), normalize_final_answer(b)
    return na == nb or _numbers_equal(na, nb)


def math_compute_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the last boxed answer of `solution_str` is equivalent to `ground_truth`, else 0.0.

    A boxed `ground_truth` (a full reference solution) is unboxed first.
    """
    boxed = last_boxed_only_string(solution_str)
    if boxed is None:
        return 0.0
    truth = str(ground_truth)
    truth_boxed = last_boxed_only_string(truth)
    if truth_boxed is not None:
        truth = remove_boxed(truth_boxed)
    return 1.0 if is_equiv(remove_boxed(boxed), truth) else 0.0


_GEO3K_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def geo3k_compute_score(solution_str: str, ground_truth: str, format_score: float = 0.1) -> float:
    """verl's Geometry3K score: (1 - format_score) * boxed accuracy (`math_compute_score`) + format_score * [the
    response is `<think>...</think>` then text holding `\\boxed{...}`]."""
    formatted = 1.0 if _GEO3K_FORMAT.fullmatch(solution_str) else 0.0
    return (1.0 - format_score) * math_compute_score(solution_str, ground_truth) + format_score * formatted
