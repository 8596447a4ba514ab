"""The forgetting metrics against hand-written matrices."""

import pytest

from adapterhub_local.forgetting import (average_accuracy, backward_transfer, carry, drops,
                                         first_steps, summarize_step,
                                         forgetting, summarize)

# Three tasks, one per step: task 0 drops 0.9 -> 0.8 -> 0.6, task 1 rises 0.7 -> 0.75.
R = [[0.9, None, None],
     [0.8, 0.7, None],
     [0.6, 0.75, 0.5]]


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert average_accuracy(R) == pytest.approx((0.6 + 0.75 + 0.5) / 3)


def test_backward_transfer_compares_the_last_row_with_the_diagonal():
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)


def test_forgetting_is_the_drop_from_the_best_earlier_accuracy():
    # task 0: best 0.9, now 0.6 -> 0.3; task 1: best 0.7 (step 1), now 0.75 -> -0.05
    assert forgetting(R) == pytest.approx((0.3 - 0.05) / 2)


def test_one_step_has_no_backward_transfer_or_forgetting():
    assert summarize([[0.8]]) == {"matrix": [[0.8]], "average_accuracy": 0.8, "bwt": None,
                                  "forgetting": None}


def test_unchanged_columns_give_zero_bwt_and_forgetting():
    same = [[0.9, None], [0.9, 0.7], [0.9, 0.7]]
    assert backward_transfer(same) == 0.0
    assert forgetting(same) == 0.0


def test_a_retrained_task_keeps_its_first_step_as_reference():
    # Step 2 re-trains task 0 (a new version) instead of adding a task.
    retrained = [[0.5, None], [0.5, 0.8], [0.7, 0.8]]
    assert first_steps(retrained) == [0, 1]
    assert backward_transfer(retrained) == pytest.approx(((0.7 - 0.5) + (0.8 - 0.8)) / 2)


def test_empty_matrix():
    assert average_accuracy([]) is None
    assert backward_transfer([]) is None


def test_drops_name_the_tasks_that_dropped_more_than_the_tolerance():
    before, after = {"a": 0.9, "b": 0.8}, {"a": 0.85, "b": 0.79, "c": 0.7}
    assert drops(before, after, 0.02) == [("a", 0.9, 0.85)]
    assert drops(before, after, 0.06) == []
    assert drops({}, after, 0.0) == []


@pytest.mark.parametrize("matrix", [
    R,
    [[0.9, None], [0.8, 0.7], [None, 0.6]],  # task 0 removed before step 3
    [[0.5, None], [0.7, None], [0.6, 0.9], [0.65, 0.8]],  # task 0 re-trained at step 2
])
def test_summaries_carried_step_by_step_equal_those_of_the_whole_matrix(matrix):
    first, best = {}, {}
    for i, values in enumerate(matrix):
        row = {j: v for j, v in enumerate(values)}
        seen = max(j + 1 for r in matrix[: i + 1] for j, v in enumerate(r) if v is not None)
        whole = summarize([r[:seen] for r in matrix[: i + 1]])
        assert summarize_step(first, best, row) == pytest.approx(
            {k: whole[k] for k in ("average_accuracy", "bwt", "forgetting")})
        first, best = carry(first, best, row)


def test_a_task_without_a_value_in_the_last_row_is_not_counted_as_forgotten():
    R = [[0.9, None],
         [0.8, 0.7],
         [None, 0.6]]  # task 0 was removed before step 3
    assert backward_transfer(R) == pytest.approx(-0.1)
    assert forgetting(R) == pytest.approx(0.1)
    assert average_accuracy(R) == pytest.approx(0.6)
