"""Forgetting metrics: pure functions over an accuracy matrix (DESIGN section 4).

R[i][j] is the accuracy on task j after step i; None where task j did not exist yet. Rows are
steps, columns tasks in order of addition. A task's "own" step is the first row where its column
has a value: with one new task per step that is the diagonal, R[j][j], as in the papers
(Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018); it stays right when a step re-trains an
existing task instead of adding one.
"""

Matrix = list[list[float | None]]


def first_steps(R: Matrix) -> list[int]:
    """For each column, the first step that has a value."""
    columns = len(R[-1]) if R else 0
    return [next(i for i, row in enumerate(R) if j < len(row) and row[j] is not None)
            for j in range(columns)]


def _old_columns(R: Matrix) -> list[int]:
    """Columns that existed before the last step and are still measured in it (the only ones
    that can be forgotten; a task removed from the store has no value in later rows)."""
    last = len(R) - 1
    return [j for j, first in enumerate(first_steps(R)) if first < last and R[-1][j] is not None]


def average_accuracy(R: Matrix) -> float | None:
    """A = mean_j R[T-1][j] over the tasks present at the last step."""
    if not R:
        return None
    values = [v for v in R[-1] if v is not None]
    return sum(values) / len(values) if values else None


def backward_transfer(R: Matrix) -> float | None:
    """BWT = mean over earlier tasks of (R[T-1][j] - R[own step of j][j]); None with one step."""
    old = _old_columns(R)
    if not old:
        return None
    firsts = first_steps(R)
    return sum(R[-1][j] - R[firsts[j]][j] for j in old) / len(old)


def forgetting(R: Matrix) -> float | None:
    """F = mean over earlier tasks of (max over earlier steps of R[l][j] - R[T-1][j])."""
    old = _old_columns(R)
    if not old:
        return None
    drops = [max(row[j] for row in R[:-1] if j < len(row) and row[j] is not None) - R[-1][j]
             for j in old]
    return sum(drops) / len(drops)


def summarize(R: Matrix) -> dict:
    return {"matrix": R, "average_accuracy": average_accuracy(R),
            "bwt": backward_transfer(R), "forgetting": forgetting(R)}


def carry(first: dict, best: dict, row: dict) -> tuple[dict, dict]:
    """A column's first value and its best value so far, carried from step to step, so that a
    new step's summaries need the previous step alone, not the whole matrix."""
    first = {**{t: v for t, v in row.items() if v is not None}, **first}
    best = {t: max(v, best.get(t, v)) for t, v in row.items() if v is not None} | {
        t: v for t, v in best.items() if row.get(t) is None}
    return first, best


def summarize_step(first: dict, best: dict, row: dict) -> dict:
    """summarize()'s numbers for the last row, from what carry() kept of the rows before it:
    first and best are {task: value} over the earlier rows, row the new one (None where a task
    was not measured). Equal to summarize() on the full matrix."""
    values = [v for v in row.values() if v is not None]
    old = [t for t, v in row.items() if v is not None and t in first]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"average_accuracy": mean(values),
            "bwt": mean([row[t] - first[t] for t in old]),
            "forgetting": mean([best[t] - row[t] for t in old])}


def drops(previous: dict, row: dict, tolerance: float) -> list[tuple[str, float, float]]:
    """(task, before, after) for each task whose value dropped by more than `tolerance` from the
    previous step to this one: what the forgetting gate refuses."""
    return [(t, previous[t], v) for t, v in row.items()
            if v is not None and previous.get(t) is not None and previous[t] - v > tolerance]
