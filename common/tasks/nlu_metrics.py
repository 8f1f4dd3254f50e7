"""The official GLUE / SuperGLUE metrics, computed by scikit-learn.

Predictions are label indices, with -1 for an invalid answer (a generation that is no label
word): it counts as wrong for accuracy and as a miss for F1 / MCC, never as a lucky class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

INVALID = -1

Metric = Callable[[Sequence[int], Sequence[int], int], float]


def accuracy(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(gold, pred))


def f1(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> float:
    """Binary F1 of class 1 (MRPC "equivalent", QQP "duplicate", as GLUE reports it)."""
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred, labels=[1], average="macro", zero_division=0.0))


def macro_f1(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> float:
    """Unweighted mean of the per-class F1 over the task's classes (CB)."""
    from sklearn.metrics import f1_score

    return float(
        f1_score(gold, pred, labels=list(range(n_labels)), average="macro", zero_division=0.0)
    )


def mcc(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> float:
    """Matthews correlation (CoLA); invalid answers form their own (always wrong) class."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(gold, pred))


METRICS: dict[str, Metric] = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "mcc": mcc}
