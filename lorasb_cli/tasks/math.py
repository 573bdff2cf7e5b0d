"""GSM8K, MATH and MATH-500: zero-shot generation on the bare problem (evaluate renders the template; `auto` picks
Alpaca, as MetaMathQA trains with), the final answer pulled from the output, exact match after normalization
(numbers for GSM8K, scored strict and flexible; math-verify equivalence for MATH)."""

from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction

from ..errors import BadInputError
from . import INVALID, GenerateTask, register_task

# Where an Alpaca-trained model starts a new turn of its own; what follows is not its answer. MetaMath's
# evaluation stops generation at these words, so cutting here scores the same outputs the same way.
_NEXT_TURN = re.compile(r"###\s*(?:Instruction|Input|Response)\s*:|Below is an instruction that describes a task")
# Generation stops at the usual spellings of a new turn. Each is a match of _NEXT_TURN, so stopping there never
# cuts the answer text shorter than `answer_text` does; the regex still cuts the other spellings.
NEXT_TURN_STOPS = (
    "### Instruction:",
    "### Input:",
    "### Response:",
    "Below is an instruction that describes a task",
)
_GSM8K_MARKER = re.compile(r"the answer is\s*:?|####|\\boxed\s*\{", re.IGNORECASE)
_MATH_MARKER = re.compile(r"the answer is\s*:?", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: optional sign and $, thousands commas, decimals, a fraction. It must not continue a word or a
# longer number, and a '-' right after a digit is subtraction ("10-3"), not a sign.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−])?(?:\$\s?)?"
    r"(?P<value>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+))?(?!\d)"
)
TIMEOUT_S = 5  # per math-verify parse or comparison; sympy can hang on adversarial LaTeX


def answer_text(output: str) -> str:
    """The model's own answer: the output up to where it starts a new Alpaca turn."""
    return _NEXT_TURN.split(output, maxsplit=1)[0]


# --- GSM8K -------------------------------------------------------------------------------------------


def _number_value(match: re.Match) -> Fraction | None:
    value = Fraction(match["value"].replace(",", ""))
    if match["den"] is not None:
        if int(match["den"]) == 0:
            return None
        value /= int(match["den"])
    return -value if match["sign"] else value


def canonical_number(value: Fraction) -> str:
    """One spelling per number, so string equality is numeric equality: "42", "1234.5", "-0.75", "1/3"."""
    if value.denominator == 1:
        return str(value.numerator)
    # A terminating decimal has a denominator dividing some 10**places (places ≤ its bit length); integer
    # arithmetic keeps every digit, where Decimal would round at 28.
    for places in range(1, value.denominator.bit_length() + 1):
        if 10**places % value.denominator == 0:
            digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
            return ("-" if value < 0 else "") + f"{digits[:-places]}.{digits[-places:]}".rstrip("0")
    return f"{value.numerator}/{value.denominator}"


def _numbers(text: str) -> list[str]:
    values = (_number_value(m) for m in _NUMBER.finditer(text))
    return [canonical_number(v) for v in values if v is not None]


def extract_strict(output: str) -> str:
    """GSM8K's strict answer, canonical, or INVALID: the first number after the last answer marker ("The answer
    is:", "####", "\\boxed{"), as MetaMath's evaluation reads it. No marker, or no number after the last one, is
    INVALID: a model that only repeats the question has not answered."""
    text = answer_text(output)
    markers = list(_GSM8K_MARKER.finditer(text))
    after = _numbers(text[markers[-1].end() :]) if markers else []
    return after[0] if after else INVALID


def extract_flexible(output: str) -> str:
    """GSM8K's flexible answer (lm-evaluation-harness's `flexible-extract`): the last number of the answer text,
    canonical, or INVALID when it has none. Markers are ignored."""
    found = _numbers(answer_text(output))
    return found[-1] if found else INVALID


def gsm8k_reference(row: dict) -> str:
    """The number after GSM8K's `####`, or the whole answer when it is a plain number."""
    answer = str(row["answer"])
    if "####" in answer:
        found = _numbers(answer.rsplit("####", 1)[1])
    else:
        match = _NUMBER.fullmatch(answer.strip().rstrip("."))
        found = _numbers(match[0]) if match else []
    if not found:
        raise BadInputError(
            f"GSM8K answer has no final number: {answer[-80:]!r}",
            hint="end each answer with '#### <number>', or make it a plain number",
        )
    return found[0]


def numbers_equal(extracted: str, reference: str) -> bool:
    a, b = _NUMBER.fullmatch(extracted), _NUMBER.fullmatch(reference)
    return a is not None and b is not None and _number_value(a) == _number_value(b)


# --- MATH ---------------------------------------------------------------------------------------------


def last_boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last `\\boxed{...}` / `\\fbox{...}`, braces balanced, or None."""
    starts = list(_BOXED.finditer(text))
    for match in reversed(starts):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return match.start(), text[match.end() : i - 1].strip()
    return None


def extract_math(output: str) -> str:
    """The answer the output states last: a `\\boxed{...}` or the line after "The answer is:"; else INVALID."""
    text = answer_text(output)
    boxed = last_boxed(text)
    stated = list(_MATH_MARKER.finditer(text))
    if stated and (boxed is None or stated[-1].start() > boxed[0]):
        line = text[stated[-1].end() :].strip().split("\n", 1)[0]
        answer = line.strip().rstrip(".").strip().strip("$").strip()
    else:
        answer = boxed[1] if boxed else ""
    return answer or INVALID


def math_reference(row: dict) -> str:
    """The row's `answer` (MATH-500), else the last `\\boxed{}` of its `solution` (the full MATH test set)."""
    if str(row.get("answer") or "").strip():
        return str(row["answer"]).strip()
    boxed = last_boxed(str(row.get("solution") or ""))
    if boxed is None or not boxed[1]:
        raise BadInputError(
            "MATH row has neither an 'answer' nor a \\boxed{} answer in its 'solution'",
            hint="add an 'answer' field to each row",
        )
    return boxed[1]


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread (and raises elsewhere);
    # off it, run without the guard rather than fail.
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
    from math_verify import parse

    return tuple(parse(f"${answer}$", parsing_timeout=_timeout()))


def math_equal(extracted: str, reference: str) -> bool:
    """Equivalence by math-verify (`\\frac{1}{2}` = `0.5` = `1/2`); any failure inside it counts as wrong."""
    from math_verify import verify

    try:
        gold, pred = _parse(reference), _parse(extracted)
        return bool(gold and pred and verify(list(gold), list(pred), timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001 - sympy fails in many ways; one odd answer is wrong, the run goes on
        return False


# --- metric -----------------------------------------------------------------------------------------


ACCURACY_METRICS = ("accuracy", "invalid", "count")  # what `accuracy` reports


def accuracy(records: list[dict]) -> dict[str, float]:
    """`accuracy` over all records and `invalid`, the share of outputs with no answer found."""
    n = len(records)
    return {
        "accuracy": sum(bool(r["correct"]) for r in records) / n if n else None,
        "invalid": sum(r["extracted"] == INVALID for r in records) / n if n else None,
        "count": n,
    }


def gsm8k_score(records: list[dict]) -> dict[str, float]:
    """`accuracy` is the strict one (MetaMath's protocol, what the paper's tables report), also as
    `strict_accuracy`; `flexible_accuracy` from `correct/flexible`; `invalid` is the strict INVALID share."""
    metrics = accuracy(records)
    n = metrics["count"]
    # Records written before the flexible filter existed lack its key; a share of some of them would mislead.
    has_flexible = bool(records) and all("correct/flexible" in r for r in records)
    flexible = sum(bool(r["correct/flexible"]) for r in records) / n if has_flexible else None
    return {
        "accuracy": metrics["accuracy"],
        "strict_accuracy": metrics["accuracy"],
        "flexible_accuracy": flexible,
        "invalid": metrics["invalid"],
        "count": n,
    }


register_task(
    GenerateTask(
        name="gsm8k",
        version=2,
        fields=("question", "answer"),
        score=gsm8k_score,
        metrics=("accuracy", "strict_accuracy", "flexible_accuracy", "invalid", "count"),
        lower_is_better=("invalid",),
        prompt=lambda row: (row["question"], None),
        reference=gsm8k_reference,
        extract=extract_strict,
        is_correct=numbers_equal,
        default_data="openai/gsm8k",
        default_split="test",
        max_new_tokens=512,
        stop=NEXT_TURN_STOPS,
        description="GSM8K grade-school math, zero-shot, exact match of the final number: strict (answer marker "
        "required, MetaMath's protocol; the headline accuracy) and flexible (the last number)",
        extra={"config": "main"},
        filters={"flexible": extract_flexible},
    )
)


def _competition_math(name: str, version: int, fields: tuple[str, ...], description: str, **kwargs) -> GenerateTask:
    """A MATH-style task: `problem` in, a LaTeX answer out, zero-shot, judged by math-verify equivalence."""
    return register_task(
        GenerateTask(
            name=name,
            version=version,
            fields=fields,
            score=accuracy,
            metrics=ACCURACY_METRICS,
            lower_is_better=("invalid",),
            prompt=lambda row: (row["problem"], None),
            reference=math_reference,
            extract=extract_math,
            is_correct=math_equal,
            default_split="test",
            max_new_tokens=512,
            stop=NEXT_TURN_STOPS,
            description=description,
            **kwargs,
        )
    )


# The full MATH test split (Hendrycks et al.: 5,000 problems, `problem` + `solution`, the answer the solution's
# last \boxed{}). The original `hendrycks/competition_math` and `lighteval/MATH` were taken down (DMCA, 2025); this
# copy is the one verl's reward routing and others load. Its subject configurations hold parts; `default` holds
# all 5,000.
_competition_math(
    "math",
    2,
    ("problem",),  # and `answer` or `solution`: `math_reference` reads either and says so if neither
    "MATH competition problems, the full 5,000-problem test set, zero-shot, math-verify equivalence",
    default_data="DigitalLearningGmbH/MATH-lighteval",
    extra={"config": "default"},
)
_competition_math(
    "math500",
    1,
    ("problem", "answer"),
    "MATH-500 (the 500-problem MATH test subset of Let's Verify Step by Step), zero-shot, math-verify equivalence",
    default_data="HuggingFaceH4/MATH-500",
)
