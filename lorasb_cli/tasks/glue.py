"""GLUE and generic text classification for sequence-classification models: the text (or text pair) of a
row, and the metrics GLUE defines, computed with scikit-learn and scipy."""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter

from .. import data
from . import ClassifyTask, register_task

# subset: (text fields, number of labels (1 = regression), metric keys, evaluation split)
GLUE = {
    "cola": (("sentence",), 2, ("matthews_correlation", "accuracy"), "validation"),
    "sst2": (("sentence",), 2, ("accuracy",), "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy"), "validation"),
    "qqp": (("question1", "question2"), 2, ("f1", "accuracy"), "validation"),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearman"), "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": (("question", "sentence"), 2, ("accuracy",), "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
}
# The metric the paper's GLUE table reports for a subset where it is not accuracy.
_PRIMARY = {"cola": "matthews_correlation", "stsb": "pearson"}
_HF_LABEL = re.compile(r"LABEL_(\d+)")


def _text(fields: tuple[str, ...], row: dict) -> str | tuple[str, str]:
    return str(row[fields[0]]) if len(fields) == 1 else (str(row[fields[0]]), str(row[fields[1]]))


def _class_id(label) -> int:
    """A GLUE label as its integer id. Models without label names predict HF's default `LABEL_<id>`; any
    other name is no GLUE class and becomes -1, a class no gold label has (so it counts as wrong)."""
    if isinstance(label, str):
        match = _HF_LABEL.fullmatch(label.strip()) or re.fullmatch(r"(\d+)", label.strip())
        return int(match[1]) if match else -1
    return int(label)


def _defined(value: float) -> float | None:
    """None for an undefined statistic (a correlation over constant predictions is NaN)."""
    return None if math.isnan(value) else float(value)


def glue_metrics(subset: str, references: list, predictions: list) -> dict[str, float]:
    """GLUE's metrics of one subset: CoLA Matthews correlation, STS-B Pearson and Spearman, MRPC and QQP
    F1 (of class 1), and accuracy for every classification subset."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    metrics: dict[str, float] = {"count": len(references)}
    if not references:
        return metrics
    if GLUE[subset][1] == 1:
        y_true, y_pred = [float(x) for x in references], [float(x) for x in predictions]
        with warnings.catch_warnings():  # constant input: scipy warns and returns NaN, reported as None
            warnings.simplefilter("ignore")
            metrics["pearson"] = _defined(pearsonr(y_true, y_pred)[0]) if len(y_true) > 1 else None
            metrics["spearman"] = _defined(spearmanr(y_true, y_pred)[0]) if len(y_true) > 1 else None
        return metrics
    y_true, y_pred = [_class_id(x) for x in references], [_class_id(x) for x in predictions]
    wanted = GLUE[subset][2]
    if "matthews_correlation" in wanted:
        metrics["matthews_correlation"] = float(matthews_corrcoef(y_true, y_pred))
    if "f1" in wanted:
        # F1 of class 1 named by `labels`: binary mode would reject the -1 of an unknown predicted name.
        metrics["f1"] = float(f1_score(y_true, y_pred, labels=[1], average="macro", zero_division=0))
    metrics["accuracy"] = float(accuracy_score(y_true, y_pred))
    return metrics


def metric_names(subset: str) -> tuple[str, ...]:
    """The names `glue_metrics(subset, ...)` reports, the paper's metric of the subset first."""
    primary = _PRIMARY.get(subset, "accuracy")
    return (primary, *(m for m in GLUE[subset][2] if m != primary), "count")


for _subset, (_fields, _labels, _metrics, _split) in GLUE.items():
    register_task(
        ClassifyTask(
            name=f"glue-{_subset}",
            version=1,
            fields=(*_fields, "label"),
            score=lambda records, subset=_subset: glue_metrics(
                subset, [r["reference"] for r in records], [r["extracted"] for r in records]
            ),
            metrics=metric_names(_subset),
            text=lambda row, fields=_fields: _text(fields, row),
            reference=lambda row, regression=_labels == 1: float(row["label"]) if regression else int(row["label"]),
            default_data="nyu-mll/glue",
            default_split=_split,
            description=f"GLUE {_subset.upper()} for sequence-classification models ({', '.join(_metrics)})",
            extra={"config": _subset, "num_labels": _labels},
        )
    )


# --- any text+label file ------------------------------------------------------------------------------


def _label_order(label) -> tuple[bool, int | float | str]:
    # Numbers in numeric order, then strings; lets labels of mixed types sort.
    return (isinstance(label, str), label)


def classification_metrics(references: list, predictions: list) -> dict:
    """Accuracy, macro-F1, per-class support and the confusion matrix (rows: gold, columns: predicted), all
    in the order of `labels`, the sorted union of gold and predicted labels."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels = sorted(set(references) | set(predictions), key=_label_order)
    # Indices rather than the labels themselves: scikit-learn rejects a mix of int and str labels.
    index = {label: i for i, label in enumerate(labels)}
    y_true, y_pred = [index[x] for x in references], [index[x] for x in predictions]
    ids = list(range(len(labels)))
    support = Counter(references)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if labels else None,
        "f1_macro": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)) if labels else None,
        "count": len(references),
        "labels": labels,
        "support": {str(label): support[label] for label in labels},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist() if labels else [],
    }


register_task(
    ClassifyTask(
        name="classification",
        version=1,
        fields=("label",),
        score=lambda records: classification_metrics(
            [r["reference"] for r in records], [r["extracted"] for r in records]
        ),
        metrics=("accuracy", "f1_macro", "count"),  # and `labels`, `support`, `confusion_matrix`: not numbers
        text=data.classification_text,
        reference=lambda row: row["label"],
        description="any text+label file: accuracy, macro-F1, per-class support and confusion matrix",
    )
)
