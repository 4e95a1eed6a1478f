"""Continual metrics (METHOD §5) on hand-worked accuracy matrices."""

import pytest

from cpt.errors import CptError
from cpt.evaluation import continual_metrics, format_matrix_table

# Matrix A: R[i][j], rows base, after t1, after t2, after t3.
A = [
    [0.2, 0.1, 0.3],
    [0.8, 0.2, 0.35],
    [0.6, 0.9, 0.4],
    [0.5, 0.7, 0.9],
]
# Matrix B: task 1 keeps improving after it is learnt, task 2 improves later (negative forgetting).
B = [
    [0.1, 0.0, 0.2],
    [0.5, 0.3, 0.1],
    [0.7, 0.6, 0.3],
    [0.4, 0.8, 0.5],
]


def test_full_matrix_a():
    m = continual_metrics(A)
    # ACC = (0.5 + 0.7 + 0.9) / 3 = 0.7
    assert m["acc"] == pytest.approx(0.7)
    # BWT = ((R31 - R11) + (R32 - R22)) / 2 = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = -0.25
    assert m["bwt"] == pytest.approx(-0.25)
    # FWT = ((R12 - R02) + (R23 - R03)) / 2 = ((0.2 - 0.1) + (0.4 - 0.3)) / 2 = 0.1
    assert m["fwt"] == pytest.approx(0.1)
    # forgetting: j=1: max(0.8, 0.6) - 0.5 = 0.3; j=2: max(0.2, 0.9) - 0.7 = 0.2; mean 0.25
    assert m["per_task_forgetting"] == pytest.approx([0.3, 0.2])
    assert m["forgetting"] == pytest.approx(0.25)
    assert m["num_tasks"] == 3 and m["num_completed"] == 3
    assert m["expert_scores"] is None and m["normalized_acc"] is None


def test_full_matrix_b_forgetting_differs_from_bwt():
    m = continual_metrics(B)
    # ACC = (0.4 + 0.8 + 0.5) / 3 = 0.5666…
    assert m["acc"] == pytest.approx(1.7 / 3)
    # BWT = ((0.4 - 0.5) + (0.8 - 0.6)) / 2 = 0.05
    assert m["bwt"] == pytest.approx(0.05)
    # FWT = ((0.3 - 0.0) + (0.3 - 0.2)) / 2 = 0.2
    assert m["fwt"] == pytest.approx(0.2)
    # forgetting: j=1: max(R11=0.5, R21=0.7) - 0.4 = 0.3; j=2: max(R12=0.3, R22=0.6) - 0.8 = -0.2
    # mean 0.05 (not -BWT = -0.05: the max is over all earlier states, not R[j][j])
    assert m["per_task_forgetting"] == pytest.approx([0.3, -0.2])
    assert m["forgetting"] == pytest.approx(0.05)


def test_partial_matrix_after_two_tasks():
    m = continual_metrics(A[:3])
    # k = 2: ACC = (R21 + R22) / 2 = (0.6 + 0.9) / 2 = 0.75
    assert m["acc"] == pytest.approx(0.75)
    # BWT = R21 - R11 = 0.6 - 0.8 = -0.2
    assert m["bwt"] == pytest.approx(-0.2)
    # FWT uses rows 1 and 2 (both present): ((0.2 - 0.1) + (0.4 - 0.3)) / 2 = 0.1
    assert m["fwt"] == pytest.approx(0.1)
    # forgetting: j=1: max(R11) - R21 = 0.8 - 0.6 = 0.2
    assert m["per_task_forgetting"] == pytest.approx([0.2])
    assert m["forgetting"] == pytest.approx(0.2)
    # row 2 over all three tasks: (0.6 + 0.9 + 0.4) / 3
    assert m["acc_all_tasks"] == pytest.approx(1.9 / 3)
    assert m["num_tasks"] == 3 and m["num_completed"] == 2


def test_partial_matrix_after_one_task():
    m = continual_metrics(A[:2])
    assert m["acc"] == pytest.approx(0.8)  # R11
    assert m["bwt"] is None and m["forgetting"] is None  # need two tasks learnt
    assert m["per_task_forgetting"] == []
    assert m["fwt"] == pytest.approx(0.1)  # only j = 2: R12 - R02 = 0.2 - 0.1
    assert m["num_completed"] == 1


def test_base_only_and_empty():
    m = continual_metrics(A[:1])
    assert (m["acc"], m["bwt"], m["fwt"], m["forgetting"]) == (None, None, None, None)
    assert m["num_tasks"] == 3 and m["num_completed"] == 0
    e = continual_metrics([])
    assert e["acc"] is None and e["num_tasks"] == 0


def test_single_task_has_no_bwt_or_fwt():
    m = continual_metrics([[0.1], [0.9]])
    assert m["acc"] == pytest.approx(0.9)
    assert m["bwt"] is None and m["fwt"] is None and m["forgetting"] is None


def test_expert_scores_normalise():
    m = continual_metrics(A, expert_scores=[0.9, 0.95, 1.0])
    assert m["expert_scores"] == [0.9, 0.95, 1.0]
    assert m["expert_acc"] == pytest.approx(0.95)
    # (0.5/0.9 + 0.7/0.95 + 0.9/1.0) / 3 = (0.555556 + 0.736842 + 0.9) / 3 = 0.730799
    assert m["normalized_acc"] == pytest.approx(0.7307992, abs=1e-6)
    # after 1 task only task 1 counts: 0.8 / 0.9
    assert continual_metrics(A[:2], [0.9, 0.95, 1.0])["normalized_acc"] == pytest.approx(0.8 / 0.9)
    with pytest.raises(CptError, match="expert_scores"):
        continual_metrics(A, expert_scores=[0.9])


def test_missing_entries_are_left_out():
    M = [row[:] for row in A]
    M[3][1] = None  # task 2 not evaluated after task 3
    m = continual_metrics(M)
    assert m["acc"] == pytest.approx((0.5 + 0.9) / 2)
    assert m["bwt"] == pytest.approx(0.5 - 0.8)  # only j = 1 defined
    assert m["per_task_forgetting"][0] == pytest.approx(0.3)
    assert m["per_task_forgetting"][1] is None
    assert m["forgetting"] == pytest.approx(0.3)


def test_bad_matrices():
    with pytest.raises(CptError, match="row 1"):
        continual_metrics([[0.1, 0.2], [0.3]])
    with pytest.raises(CptError, match="at most 3"):
        continual_metrics([[0.1, 0.2]] * 4)


def test_format_matrix_table():
    text = format_matrix_table(A, ["t1", "t2", "t3"], expert_scores=[0.9, 0.95, 1.0])
    lines = text.splitlines()
    table = lines[:-1]
    assert len({len(line) for line in table}) == 1  # fixed width
    assert table[0].split() == ["state", "t1", "t2", "t3"]
    assert table[2].split() == ["base", "0.200", "0.100", "0.300"]
    assert table[3].split() == ["after", "t1", "0.800", "0.200", "0.350"]
    assert table[5].split() == ["after", "t3", "0.500", "0.700", "0.900"]
    assert table[6].split() == ["expert", "0.900", "0.950", "1.000"]
    assert lines[-1].startswith("ACC 0.700  BWT -0.250  FWT +0.100  forgetting 0.250")
    assert "ACC/expert 0.731" in lines[-1]


def test_format_partial_matrix_table():
    text = format_matrix_table(A[:2], ["alpha", "b", "c"])
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["base", "after"]
    assert len(lines) == 5
    assert lines[-1] == "ACC 0.800  BWT n/a  FWT +0.100  forgetting n/a  (after 1 of 3 tasks)"
    with pytest.raises(CptError, match="task names"):
        format_matrix_table(A, ["t1", "t2"])
