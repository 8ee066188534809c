"""edgemap.metrics against cases small enough to check by hand, and against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from edgemap import metrics as m

# 3 classes, 6 samples, worked by hand:
#   true: 0 0 0 1 1 2
#   pred: 0 0 1 1 2 2
# confusion rows=true: [2 1 0] [0 1 1] [0 0 1]
# precision: c0 2/2=1, c1 1/2, c2 1/2     recall: c0 2/3, c1 1/2, c2 1/1
# f1: c0 0.8, c1 0.5, c2 2/3
Y = np.array([0, 0, 0, 1, 1, 2])
P = np.array([0, 0, 1, 1, 2, 2])


def test_hand_checked_case() -> None:
    cm = m.confusion_matrix(Y, P, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m.accuracy(Y, P) == pytest.approx(4 / 6)
    prec, rec, f1, sup = m.per_class(cm)
    assert prec.tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert rec.tolist() == pytest.approx([2 / 3, 0.5, 1.0])
    assert f1.tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert sup.tolist() == [3, 2, 1]
    mp, mr, mf = m.macro(cm)
    assert (mp, mr, mf) == pytest.approx((2 / 3, (2 / 3 + 0.5 + 1) / 3, (0.8 + 0.5 + 2 / 3) / 3))
    assert m.agreement(P, np.array([0, 1, 1, 1, 2, 0])) == pytest.approx(4 / 6)


def test_topk_and_report() -> None:
    # 7 classes so top-5 is reported; true class 6 has the lowest score in row 0 → top-5 miss
    scores = np.tile(np.arange(7, 0, -1, dtype=np.float32), (2, 1))  # class 0 highest … class 6 lowest
    y = np.array([6, 4])
    assert m.topk_accuracy(y, scores, 5) == pytest.approx(0.5)
    assert m.topk_accuracy(y, scores, 1) == 0.0
    classes = [f"c{i}" for i in range(7)]
    rep = m.classification_report(y, scores, classes)
    assert rep.n == 2 and rep.accuracy == 0.0 and rep.top5 == pytest.approx(0.5)
    assert rep.confusion[6][0] == 1 and rep.confusion[4][0] == 1
    assert [r["class"] for r in rep.per_class] == classes
    # five classes or fewer: no top-5 figure
    assert m.classification_report(Y, np.eye(3)[P], ["a", "b", "c"]).top5 is None


def test_ties_and_absent_classes() -> None:
    # a class absent from both labels and predictions does not drag the macro average down (sklearn default)
    cm = m.confusion_matrix(np.array([0, 1]), np.array([0, 1]), 4)
    assert m.macro(cm) == (1.0, 1.0, 1.0)
    # ties: argmax and top-k both prefer the lower index
    assert m.topk_accuracy(np.array([0]), np.array([[1.0, 1.0, 0.0]]), 1) == 1.0


def test_matches_sklearn_on_random_labels() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    y[y == 3] = 2  # class 3 only predicted, never true
    cm = m.confusion_matrix(y, p, 6)  # class 5: neither
    assert np.array_equal(cm, sk.confusion_matrix(y, p, labels=range(6)))
    prf = sk.precision_recall_fscore_support(y, p, average="macro", zero_division=0)[:3]
    assert m.macro(cm) == pytest.approx(prf)


@pytest.mark.parametrize(
    "call",
    [
        lambda: m.confusion_matrix(np.array([0, 1]), np.array([0]), 2),
        lambda: m.confusion_matrix(np.array([0, 5]), np.array([0, 1]), 2),
        lambda: m.accuracy(np.array([0.5]), np.array([0])),
        lambda: m.topk_accuracy(np.array([0, 1]), np.zeros((3, 2)), 1),
    ],
)
def test_bad_inputs_raise(call) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        call()


def test_options_from_python_take_a_name_for_a_tuple_and_check_threads() -> None:
    """EvalOptions(runtimes="cpu") ran runtimes 'c' and 'p' ("unknown runtime 'c'"), BenchOptions(batches=1) was a
    TypeError, threads=-1 a raw torch RuntimeError or a ParityError blaming OpenVINO."""
    from edgemap.bench import BenchOptions
    from edgemap.errors import EdgemapError
    from edgemap.evaluate import EvalOptions
    from edgemap.export import ExportOptions

    assert EvalOptions(runtimes="cpu, openvino").runtimes == ("cpu", "openvino")
    assert EvalOptions(precisions=["int8"]).precisions == ("int8",)
    assert BenchOptions(batches=1).batches == (1,) and BenchOptions(batches="1,8").batches == (1, 8)
    assert ExportOptions(targets="cpu").targets == ("cpu",) and ExportOptions().targets is None
    assert BenchOptions(threads=np.int64(2)).threads == 2  # a sweep over np.arange
    for make in (lambda: EvalOptions(threads=-1), lambda: BenchOptions(threads=0), lambda: ExportOptions(threads=1.5),
                 lambda: BenchOptions(batches="one")):
        with pytest.raises(EdgemapError, match="--threads|--batch"):
            make()
