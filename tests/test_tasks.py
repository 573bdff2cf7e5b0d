"""Evaluation tasks: registry, prompts, answer extraction and metrics on hand-written cases (no models)."""

from __future__ import annotations

import math
import threading

import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef

from lorasb_cli import templates
from lorasb_cli.errors import BadInputError
from lorasb_cli.tasks import (
    INVALID,
    ChoiceTask,
    ClassifyTask,
    GenerateTask,
    PerplexityTask,
    get_task,
    runner,
    task_names,
)
from lorasb_cli.tasks.commonsense import subtask

GLUE_SUBSETS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]


def record(reference, extracted, correct=None, **extra) -> dict:
    return {"reference": reference, "extracted": extracted, "correct": correct, **extra}


# --- registry -----------------------------------------------------------------------------------------


def test_every_task_is_registered_with_a_version_and_description():
    expected = {"gsm8k", "math", "math500", "commonsense", "classification", "perplexity"}
    assert set(task_names()) == expected | {f"glue-{s}" for s in GLUE_SUBSETS}
    versions = {"gsm8k": 2, "math": 2}  # gsm8k: strict scoring; math: the full test set. Every other task is at 1.
    for name in task_names():
        task = get_task(name)
        assert task.name == name and task.version == versions.get(name, 1) and task.description
        assert task.scoring in ("generate", "classify", "perplexity")


def test_each_task_is_the_shape_of_its_scoring_and_scoring_switches_only_where_it_can():
    shapes = {"generate": GenerateTask, "classify": ClassifyTask, "perplexity": PerplexityTask}
    for name in task_names():
        task = get_task(name)
        assert isinstance(task, shapes[task.scoring]) and task.scored_as(None) is task.scored_as(task.scoring) is task
    choice = get_task("commonsense").scored_as("loglik")
    assert isinstance(choice, ChoiceTask) and choice.scoring == "loglik"
    assert (choice.name, choice.version, choice.choices(BOOLQ)) == ("commonsense", 1, ["true", "false"])
    with pytest.raises(BadInputError, match="no answer options"):
        get_task("gsm8k").scored_as("loglik")
    with pytest.raises(BadInputError, match="scored by classify, not generate"):
        get_task("glue-sst2").scored_as("generate")
    with pytest.raises(BadInputError, match="unknown --scoring 'vibes'"):
        get_task("gsm8k").scored_as("vibes")


SAMPLE_ROWS = {  # a few rows per generate/perplexity task; classification rows are made from the task's fields
    "gsm8k": [{"question": "1+0?", "answer": "#### 1"}, {"question": "1+1?", "answer": "#### 2"}],
    "math": [{"problem": "1+0?", "answer": "1"}, {"problem": "1+1?", "solution": "$\\boxed{2}$"}],
    "math500": [{"problem": "1+0?", "answer": "1"}, {"problem": "1+1?", "answer": "2"}],
    "commonsense": [
        {"instruction": "Sky blue?\n\nAnswer format: true/false", "answer": "true", "task": "boolq"},
        {"instruction": "Pick one.\n\nAnswer format: option1/option2", "answer": "option2"},
    ],
    "perplexity": [{"text": "the cat sat"}, {"text": "on the mat"}],
}


class FakeAnswerer:
    """Answers anything: a stated answer, then no answer; classes 1, 0, ... (scores for regression); losses."""

    def __init__(self, regression: bool = False):
        self.regression = regression

    def generate(self, prompts, max_new_tokens=None, stop=()):
        return ["The answer is: 1 true option1 #### 1" if i % 2 == 0 else "nothing" for i in range(len(prompts))]

    def loglik(self, prompt, choices):
        return [-float(i) for i in range(len(choices))]

    def classify(self, texts):
        return [i * 0.7 if self.regression else (i + 1) % 2 for i in range(len(texts))]

    def losses(self, rows):
        return [(1.5, 3 * i) for i in range(len(rows))]  # the first row has no supervised token


def sample_rows(task) -> list[dict]:
    if not isinstance(task, ClassifyTask):
        return SAMPLE_ROWS[task.name]
    regression = task.extra.get("num_labels") == 1
    texts = [f for f in task.fields if f != "label"] or ["text"]
    return [{**{f: f"{f} {i}" for f in texts}, "label": i * 0.5 if regression else i % 2} for i in range(4)]


@pytest.mark.parametrize("name", [*task_names(), "commonsense:loglik"])
def test_declared_metrics_are_the_numbers_the_score_reports(name):
    """`metrics` is exactly the numeric keys of `score` on a small fake run, plus `NAME/<subtask>` for each
    `subtask_metrics` NAME and subtask of the rows; the primary `metric` comes first."""
    name, _, scoring = name.partition(":")
    task = get_task(name).scored_as(scoring or None)
    rows = sample_rows(task)
    answerer = FakeAnswerer(regression=task.extra.get("num_labels") == 1)
    metrics = task.score(runner.evaluate_rows(task, rows, answerer, templates.Template("alpaca", None)))
    numeric = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    per_subtask = {f"{m}/{subtask(row)}" for m in task.subtask_metrics for row in rows}
    assert numeric == set(task.metrics) | per_subtask
    assert task.metric == task.metrics[0] and all(task.has_metric(k) for k in numeric)
    assert set(task.lower_is_better) <= set(task.metrics)  # a declared direction names a reported metric
    assert not task.has_metric("accuracy/") and not task.has_metric("nonsense")


def test_unknown_task_suggests_the_close_name():
    with pytest.raises(BadInputError, match="did you mean 'gsm8k'"):
        get_task("gsm8kk")


# --- gsm8k --------------------------------------------------------------------------------------------


def test_gsm8k_prompt_data_and_reference():
    """The prompt is the question unrendered, (instruction, None): evaluate applies the template."""
    task = get_task("gsm8k")
    assert task.prompt({"question": "What is 2+2?", "answer": "#### 4"}) == ("What is 2+2?", None)
    assert "strict" in task.description and "flexible" in task.description
    assert (task.default_data, task.default_split, task.extra["config"], task.max_new_tokens) == (
        "openai/gsm8k",
        "test",
        "main",
        512,
    )
    assert task.reference({"answer": "She sells 16 - 3 = 13 eggs.\n#### 1,300"}) == "1300"
    assert task.reference({"answer": "-2.50"}) == "-2.5"
    with pytest.raises(BadInputError, match="no final number"):
        task.reference({"answer": "no number here"})


@pytest.mark.parametrize(
    ("output", "strict", "flexible"),
    [
        ("The answer is: $1,234.50", "1234.5", "1234.5"),
        ("He loses 5 dollars.\nThe answer is: -5", "-5", "-5"),
        ("The answer is: 18", "18", "18"),
        ("#### 42.", "42", "42"),
        ("The answer is: 42.0", "42", "42"),
        ("The answer is: 3/4", "0.75", "0.75"),
        ("She gets \\boxed{1,000} dollars", "1000", "1000"),
        ("So she has 18 apples.", INVALID, "18"),  # no marker: strict has no answer, flexible takes the last number
        ("It is -$5.", INVALID, "-5"),
        ("3/9 of them", INVALID, "1/3"),
        ("She keeps 10-3", INVALID, "3"),  # a '-' after a digit is subtraction, not a sign
        ("The answer is 18 dollars per 2 days", "18", "2"),  # strict: the first number after the marker
        ("#### 18\nThen she buys 2 more, 20 in all.", "18", "20"),
        ("The answer is: 5. #### 18 20", "18", "20"),  # strict reads after the last marker
        ("The answer is: 12. The answer is: unknown", INVALID, "12"),  # no number after the last marker
        ("", INVALID, INVALID),
        ("I do not know.", INVALID, INVALID),
    ],
)
def test_gsm8k_strict_and_flexible_extraction(output, strict, flexible):
    task = get_task("gsm8k")
    assert task.extract(output) == strict
    assert task.filters["flexible"](output) == flexible


def test_gsm8k_model_that_repeats_the_question():
    """A model that only repeats the question is invalid under strict, and scored on the question's last number
    under flexible. A new Alpaca turn the model writes (`### Instruction:` ...) is not part of its answer."""
    task = get_task("gsm8k")
    strict, flexible = task.extract, task.filters["flexible"]
    question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."
    assert (strict(question), flexible(question)) == (INVALID, "48")
    output = f"The answer is: 72\n\n{question}"
    assert (strict(output), flexible(output)) == ("72", "48")
    output = f"{question} 48 / 2 = 24. 48 + 24 = 72. The answer is: 72\n{question}"
    assert (strict(output), flexible(output)) == ("72", "48")
    output = f"The answer is: 72\n\n### Instruction:\n{question}\n\n### Response:\nThe answer is: 5"
    assert (strict(output), flexible(output)) == ("72", "72")
    output = "### Instruction:\nWhat is 12 plus 30?"
    assert (strict(output), flexible(output)) == (INVALID, INVALID)


@pytest.mark.parametrize("name", ["gsm8k", "math", "math500"])
def test_math_stops_at_a_new_turn_and_scores_the_cut_output_the_same(name):
    """Generation stops at the next Alpaca turn; cut there, every output extracts and scores as uncut."""
    task = get_task(name)
    assert "### Instruction:" in task.stop and get_task("commonsense").stop == ()
    outputs = [
        "7 + 3 = 10. The answer is: 10\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\nThe answer is: 4",
        "The answer is: \\boxed{5}### Response: The answer is: 6",
        "So 8.\nBelow is an instruction that describes a task. The answer is: 9",
        "###Instruction: 3 (a spelling only the regex cuts). The answer is: 3",
        "#### 12",
    ]
    for output in outputs:
        assert not any(stop in task.cut(output) for stop in task.stop)
        assert task.judge(task.cut(output), "10") == task.judge(output, "10")


def test_gsm8k_judge_writes_strict_and_flexible_keys():
    task = get_task("gsm8k")
    assert task.judge("So she has 18 apples.", "18") == {
        "extracted": INVALID,
        "correct": False,
        "extracted/flexible": "18",
        "correct/flexible": True,
    }
    assert task.judge("#### 18\nThen she buys 2 more, 20 in all.", "20") == {
        "extracted": "18",
        "correct": False,
        "extracted/flexible": "20",
        "correct/flexible": True,
    }
    assert task.judge("The answer is: 1,234.50", "1234.5") == {
        "extracted": "1234.5",
        "correct": True,
        "extracted/flexible": "1234.5",
        "correct/flexible": True,
    }
    assert get_task("math").judge("\\boxed{\\frac{1}{2}}", "0.5") == {"extracted": "\\frac{1}{2}", "correct": True}


def test_gsm8k_numbers_compare_after_normalization():
    task = get_task("gsm8k")
    assert task.is_correct(task.extract("The answer is: $1,234.50"), task.reference({"answer": "#### 1234.5"}))
    assert task.is_correct("42", "42.0") and task.is_correct("0.75", "3/4")
    assert not task.is_correct("-5", "5") and not task.is_correct("42", "43")


# --- math ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{x^{2}+\\frac{1}{\\sqrt{2}}} is it", "x^{2}+\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("First \\boxed{3}, then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # the last box
        ("We get 4.\nThe answer is: $\\frac{3}{4}$.\n", "\\frac{3}{4}"),
        ("\\boxed{3}\nThe answer is: 4", "4"),  # whichever is stated last
        ("The answer is: 5\n\n### Instruction:\nFind x. The answer is: 6", "5"),
        ("\\boxed{unclosed", INVALID),
        ("", INVALID),
    ],
)
def test_math_extraction(output, expected):
    assert get_task("math").extract(output) == expected


def test_math_is_the_full_test_set_and_math500_its_own_task():
    full, subset = get_task("math"), get_task("math500")
    assert (full.default_data, full.default_split, full.extra) == (
        "DigitalLearningGmbH/MATH-lighteval",
        "test",
        {"config": "default"},
    )
    assert "5,000" in full.description and "MATH-500" not in full.description
    assert (subset.default_data, subset.default_split, subset.extra, subset.fields) == (
        "HuggingFaceH4/MATH-500",
        "test",
        {},
        ("problem", "answer"),
    )
    assert "MATH-500" in subset.description
    for task in (full, subset):
        assert task.prompt({"problem": "Find x.", "answer": "2"}) == ("Find x.", None)
        assert task.filters == {}
    # The full set's rows carry only a solution; MATH-500's an answer as well.
    row = {"problem": "p", "level": "Level 2", "type": "Algebra", "solution": "So $x = \\boxed{-\\frac{3}{2}}$."}
    assert full.reference(row) == "-\\frac{3}{2}"
    assert subset.reference({"problem": "p", "solution": "s \\boxed{\\dfrac{1}{2}}", "answer": "\\frac{1}{2}"}) == (
        "\\frac{1}{2}"
    )


def test_math_reference_prefers_the_answer_field():
    task = get_task("math")
    assert task.reference({"problem": "p", "solution": "s \\boxed{2}", "answer": "3"}) == "3"
    assert task.reference({"problem": "p", "solution": "so $\\boxed{\\frac{a}{\\{b\\}}}$."}) == "\\frac{a}{\\{b\\}}"
    with pytest.raises(BadInputError, match="boxed"):
        task.reference({"problem": "p", "solution": "no box"})


def test_math_equivalence_by_math_verify():
    task = get_task("math")
    assert task.is_correct(task.extract("\\boxed{\\frac{1}{2}}"), "0.5")
    assert task.is_correct("0.5", "\\frac{1}{2}") and task.is_correct("\\dfrac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}")
    assert not task.is_correct("0.6", "\\frac{1}{2}") and not task.is_correct("x", "1")


def test_math_verify_off_the_main_thread():
    """math-verify's timeout uses signal.alarm, which raises off the main thread; the task must not."""
    results = []
    worker = threading.Thread(target=lambda: results.append(get_task("math").is_correct("0.25", "\\frac14")))
    worker.start()
    worker.join()
    assert results == [True]


def with_flexible(extracted, correct) -> dict:
    return {"extracted/flexible": extracted, "correct/flexible": correct}


def test_gsm8k_score_reports_strict_and_flexible_accuracy():
    records = [
        record("1", "1", True, **with_flexible("1", True)),
        record("2", "3", False, **with_flexible("2", True)),  # strict took the first number after the marker
        record("4", INVALID, False, **with_flexible("4", True)),  # no marker
        record("5", "5", True, **with_flexible("6", False)),
    ]
    assert get_task("gsm8k").score(records) == {
        "accuracy": 0.5,
        "strict_accuracy": 0.5,
        "flexible_accuracy": 0.75,
        "invalid": 0.25,
        "count": 4,
    }


def test_gsm8k_score_of_records_without_the_flexible_filter():
    """Records written before the filter existed (or some of them) give no flexible accuracy, not a crash."""
    old = [record("1", "1", True), record("2", INVALID, False)]
    assert get_task("gsm8k").score(old) == {
        "accuracy": 0.5,
        "strict_accuracy": 0.5,
        "flexible_accuracy": None,
        "invalid": 0.5,
        "count": 2,
    }
    mixed = [*old, record("3", "3", True, **with_flexible("3", True))]
    assert get_task("gsm8k").score(mixed)["flexible_accuracy"] is None
    assert get_task("gsm8k").score([])["accuracy"] is None


def test_math_accuracy_and_invalid_share():
    records = [record("1", "1", True), record("2", "3", False), record("4", INVALID, False), record("5", "5", True)]
    assert get_task("math").score(records) == {"accuracy": 0.5, "invalid": 0.25, "count": 4}
    assert get_task("math500").score(records) == {"accuracy": 0.5, "invalid": 0.25, "count": 4}


# --- commonsense --------------------------------------------------------------------------------------

BOOLQ = {
    "instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
    "Answer format: true/false",
    "answer": "true",
}
ARC = {
    "instruction": "Please choose the correct answer to the question: Which is a mammal?\n\nAnswer1: frog "
    "Answer2: whale Answer3: shark Answer4: trout Answer5: eel\n\n"
    "Answer format: answer1/answer2/answer3/answer4/answer5",
    "answer": "answer2",
    "task": "ARC-Challenge",
}


def test_commonsense_prompt_reference_and_choices():
    task = get_task("commonsense")
    assert task.prompt(BOOLQ) == (BOOLQ["instruction"], None)
    assert task.prompt({**BOOLQ, "input": ""}) == (BOOLQ["instruction"], None)  # an empty input is no input
    assert task.prompt({**BOOLQ, "input": "The sky is blue."}) == (BOOLQ["instruction"], "The sky is blue.")
    assert task.reference({"answer": " Solution1 "}) == "solution1"
    assert task.choices(BOOLQ) == ["true", "false"]
    assert task.choices(ARC) == ["answer1", "answer2", "answer3", "answer4", "answer5"]
    assert task.choices({"instruction": "Which ending?", "answer": "ending3"}) == [f"ending{i}" for i in range(1, 5)]
    with pytest.raises(BadInputError, match="Answer format"):
        task.choices({"instruction": "Which?", "answer": "answer1"})


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("the correct answer is true", "true"),
        ("The correct answer is Solution2.", "solution2"),
        ("answer3 because answer1 is wrong", "answer3"),  # the first answer word
        ("option1", "option1"),
        ("the correct answer is ending4", "ending4"),
        ("that is untrue", INVALID),  # whole words only
        ("the correct answer is answer9", INVALID),
        ("", INVALID),
    ],
)
def test_commonsense_extraction(output, expected):
    assert get_task("commonsense").extract(output) == expected


def test_commonsense_per_task_and_average_accuracy():
    records = [
        record("true", "true", True, task="boolq"),
        record("false", "true", False, task="boolq"),
        record("answer2", "answer2", True, task="ARC-Challenge"),  # LLM-Adapters' folder name
        record("answer1", "answer1", True, task="arc-c"),
        record("answer3", INVALID, False, task="arc-c"),
        record("option1", "option1", True),  # no task field: option words are WinoGrande's
    ]
    metrics = get_task("commonsense").score(records)
    assert metrics["accuracy/boolq"] == 0.5
    assert metrics["accuracy/arc-c"] == pytest.approx(2 / 3) and metrics["count/arc-c"] == 3
    assert metrics["accuracy/winogrande"] == 1.0
    assert metrics["accuracy"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert metrics["accuracy_micro"] == pytest.approx(4 / 6)
    assert metrics["invalid"] == pytest.approx(1 / 6) and metrics["count"] == 6


def test_commonsense_answer_words_shared_by_tasks_without_a_task_field():
    metrics = get_task("commonsense").score([record("answer1", "answer1", True), record("answer2", "answer1", False)])
    assert metrics["accuracy/commonsense"] == 0.5 and metrics["accuracy"] == 0.5


# --- GLUE and classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subset", "row", "expected"),
    [
        ("cola", {"sentence": "a b", "label": 1}, "a b"),
        ("mrpc", {"sentence1": "a", "sentence2": "b", "label": 0}, ("a", "b")),
        ("qqp", {"question1": "a", "question2": "b", "label": 0}, ("a", "b")),
        ("mnli", {"premise": "a", "hypothesis": "b", "label": 2}, ("a", "b")),
        ("qnli", {"question": "a", "sentence": "b", "label": 1}, ("a", "b")),
    ],
)
def test_glue_text_fields(subset, row, expected):
    task = get_task(f"glue-{subset}")
    assert task.text(row) == expected
    assert set(task.fields) == {*row}
    assert task.default_data == "nyu-mll/glue" and task.extra["config"] == subset


def test_glue_splits_and_label_counts():
    assert get_task("glue-mnli").default_split == "validation_matched"
    assert get_task("glue-rte").default_split == "validation"
    assert get_task("glue-stsb").extra["num_labels"] == 1 and get_task("glue-mnli").extra["num_labels"] == 3
    assert get_task("glue-stsb").reference({"label": 3}) == 3.0 and get_task("glue-sst2").reference({"label": 1}) == 1


GOLD = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
PRED = [1, 0, 0, 1, 1, 1, 0, 1, 1, 0]


def glue_score(subset: str, gold: list, pred: list) -> dict:
    return get_task(f"glue-{subset}").score([record(g, p) for g, p in zip(gold, pred)])


def test_glue_metrics_equal_scikit_learn_and_scipy():
    cola = glue_score("cola", GOLD, PRED)
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(GOLD, PRED))
    mrpc = glue_score("mrpc", GOLD, PRED)
    assert mrpc["f1"] == pytest.approx(f1_score(GOLD, PRED)) and mrpc["accuracy"] == accuracy_score(GOLD, PRED)
    assert set(glue_score("rte", GOLD, PRED)) == {"accuracy", "count"}
    gold = [0.0, 1.2, 2.5, 3.1, 4.8, 5.0]
    pred = [0.3, 1.0, 2.9, 2.7, 4.1, 4.9]
    stsb = glue_score("stsb", gold, pred)
    assert stsb["pearson"] == pytest.approx(pearsonr(gold, pred)[0])
    assert stsb["spearman"] == pytest.approx(spearmanr(gold, pred)[0])
    assert glue_score("stsb", gold, [1.0] * 6)["pearson"] is None  # undefined for constant predictions


def test_glue_reads_hf_default_label_names():
    """A head without label names predicts `LABEL_<id>`; any other name counts as wrong."""
    assert glue_score("sst2", [1, 0, 1], ["LABEL_1", "LABEL_0", "positive"])["accuracy"] == pytest.approx(2 / 3)
    mrpc = glue_score("mrpc", [1, 0, 1, 1], ["LABEL_1", "0", "other", 1])
    assert mrpc["f1"] == pytest.approx(f1_score([1, 0, 1, 1], [1, 0, -1, 1], labels=[1], average="macro"))


def test_classification_confusion_matrix_and_macro_f1():
    gold = ["earn", "acq", "earn", "crude", "acq", "earn"]
    pred = ["earn", "earn", "earn", "crude", "acq", "trade"]
    task = get_task("classification")
    metrics = task.score([record(g, p) for g, p in zip(gold, pred)])
    labels = ["acq", "crude", "earn", "trade"]
    assert metrics["labels"] == labels
    assert metrics["confusion_matrix"] == confusion_matrix(gold, pred, labels=labels).tolist()
    assert metrics["confusion_matrix"] == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 2, 1], [0, 0, 0, 0]]
    assert metrics["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["support"] == {"acq": 2, "crude": 1, "earn": 3, "trade": 0}


def test_classification_text_fields_and_integer_labels():
    task = get_task("classification")
    assert task.text({"text": "t", "label": 0}) == "t"
    assert task.text({"question": "q", "sentence": "s", "label": 0}) == ("q", "s")  # the pair, not `sentence`
    assert task.text({"premise": "p", "hypothesis": "h", "label": "entailment"}) == ("p", "h")
    with pytest.raises(BadInputError, match="no text fields"):
        task.text({"body": "b", "label": 0})
    metrics = task.score([record(2, 2), record(0, 2), record(10, 10)])
    assert metrics["labels"] == [0, 2, 10] and metrics["confusion_matrix"] == [[0, 1, 0], [0, 1, 0], [0, 0, 1]]


# --- perplexity ---------------------------------------------------------------------------------------


def test_perplexity_aggregation():
    records = [{"loss": 2.0, "tokens": 10}, {"loss": 1.0, "tokens": 30}, {"loss": 0.0, "tokens": 0}]
    metrics = get_task("perplexity").score(records)
    assert metrics["loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert metrics["perplexity"] == pytest.approx(math.exp(1.25))
    assert metrics["loss_per_sample"] == pytest.approx(1.5)
    assert (metrics["tokens"], metrics["count"], metrics["skipped"]) == (40, 3, 1)
    assert get_task("perplexity").score([{"loss": 800.0, "tokens": 1}])["perplexity"] == math.inf


def test_tasks_declare_the_direction_of_their_metrics():
    assert get_task("glue-cola").metric == "matthews_correlation" and get_task("glue-cola").higher_is_better()
    assert get_task("glue-stsb").metric == "pearson" and get_task("glue-mrpc").metric == "accuracy"
    perplexity = get_task("perplexity")
    assert perplexity.metric == "loss" and not perplexity.higher_is_better()
    assert not perplexity.higher_is_better("perplexity") and perplexity.higher_is_better("tokens")
    gsm8k = get_task("gsm8k")
    assert gsm8k.higher_is_better() and not gsm8k.higher_is_better("invalid")
    assert get_task("commonsense").higher_is_better("accuracy/boolq")
