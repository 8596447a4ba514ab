"""GaussianRouter on hand-made feature clusters: routing, abstention, composition weights."""

import pytest
import torch

from adapterhub_local import lexical
from adapterhub_local.router import GaussianRouter, Route, TaskStats, task_stats

DIM = 8


def cluster(center: torch.Tensor, n: int, spread: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return center + spread * torch.randn(n, DIM, generator=gen)


def make_task(centers: list[torch.Tensor], labels: list[str], spread=0.3, seed=0, n=60) -> tuple:
    """(stats, test features) of a task whose classes sit at the given centers."""
    fit = torch.cat([cluster(c, n, spread, seed + i) for i, c in enumerate(centers)])
    held = torch.cat([cluster(c, 20, spread, seed + 100 + i) for i, c in enumerate(centers)])
    test = torch.cat([cluster(c, 30, spread, seed + 200 + i) for i, c in enumerate(centers)])
    y = [i for i in range(len(centers)) for _ in range(n)]
    return task_stats(fit, y, labels, held), test


def axis(i: int, scale: float = 3.0) -> torch.Tensor:
    return torch.eye(DIM)[i] * scale


@pytest.fixture
def three_tasks():
    return {"a": make_task([axis(0), axis(1)], ["x", "y"], seed=0),
            "b": make_task([axis(2), axis(3)], ["p", "q"], seed=10),
            "c": make_task([axis(4), -axis(4)], ["u", "v"], seed=20)}


def test_well_separated_tasks_are_routed_right(three_tasks):
    router = GaussianRouter().fit({t: s for t, (s, _) in three_tasks.items()})
    for task, (_, test) in three_tasks.items():
        routes = router.route(test)
        assert sum(r.tasks == [task] for r in routes) / len(routes) >= 0.98


def test_far_inputs_abstain_and_near_ones_do_not(three_tasks):
    router = GaussianRouter().fit({t: s for t, (s, _) in three_tasks.items()})
    far = torch.full((3, DIM), 40.0)
    assert all(r.tasks == [] and r.reason for r in router.route(far))
    near = torch.stack([axis(0), axis(2), axis(4)])
    assert [r.tasks for r in router.route(near)] == [["a"], ["b"], ["c"]]


def test_compose_weights_sum_to_one_and_are_ordered():
    wide = {"a": make_task([axis(0), axis(1)], ["x", "y"], spread=1.0, seed=0),
            "b": make_task([axis(2), axis(3)], ["p", "q"], spread=1.0, seed=10)}
    router = GaussianRouter().fit({t: s for t, (s, _) in wide.items()})
    midway = ((axis(0) + axis(2)) / 2 + 0.1 * axis(0)).unsqueeze(0)  # between a and b, nearer a
    route = router.route(midway, top_k=2)[0]
    assert sorted(route.tasks) == ["a", "b"]
    assert sum(route.weights) == pytest.approx(1.0)
    assert route.weights[0] >= route.weights[1] > 0.05  # a calibrated mix, not 1 and 1e-30


def test_overlapping_tasks_share_weight():
    # Two tasks drawn from the same place: the router cannot tell them apart and says so.
    a, test = make_task([axis(0), axis(1)], ["x", "y"], spread=0.5, seed=0)
    b, _ = make_task([axis(0), axis(1)], ["x", "y"], spread=0.5, seed=50)
    routes = GaussianRouter().fit({"a": a, "b": b}).route(test, top_k=2)
    mean_first = sum(r.weights[0] for r in routes) / len(routes)
    assert mean_first < 0.8


def test_save_and_load_give_the_same_routes(three_tasks, tmp_path):
    router = GaussianRouter().fit({t: s for t, (s, _) in three_tasks.items()})
    router.save(tmp_path, {"a": 1, "b": 1, "c": 2})
    loaded = GaussianRouter.load(tmp_path)
    x = three_tasks["b"][1]
    assert torch.equal(loaded.task_probabilities(x), router.task_probabilities(x))
    assert loaded.threshold_ == router.threshold_ and loaded.tasks_ == ["a", "b", "c"]


def test_stats_round_trip_and_hold_no_texts(three_tasks, tmp_path):
    stats = three_tasks["a"][0]
    stats.save(tmp_path)
    loaded = TaskStats.load(tmp_path)
    assert loaded.labels == ["x", "y"] and torch.equal(loaded.scatter, stats.scatter)
    assert loaded.counts.tolist() == [60.0, 60.0]


def test_statistics_add_up_so_a_refit_never_needs_old_rows():
    x = cluster(axis(0), 50, 0.5, seed=1)
    y = [0] * 25 + [1] * 25
    whole = task_stats(x, y, ["x", "y"], x[:5])
    first, second = task_stats(x[:20], y[:20], ["x", "y"], x[:5]), task_stats(x[20:], y[20:], ["x", "y"], x[:5])
    assert torch.allclose(whole.sums, first.sums + second.sums)
    assert torch.allclose(whole.scatter, first.scatter + second.scatter)
    assert torch.equal(whole.counts, first.counts + second.counts)


def test_the_features_a_router_reads_travel_with_its_statistics(three_tasks, tmp_path):
    """Statistics name their features and a router reads those; statistics saved before
    features had names read "middle", and one router never mixes two kinds."""
    import json

    stats = {t: s for t, (s, _) in three_tasks.items()}
    assert {s.features for s in stats.values()} == {"bottom_half"}
    renamed = {t: TaskStats(**{**vars(s), "features": "middle"}) for t, s in stats.items()}
    router = GaussianRouter().fit(renamed)
    router.save(tmp_path / "r", {t: 1 for t in stats})
    assert router.features_ == GaussianRouter.load(tmp_path / "r").features_ == "middle"
    stats["a"].save(tmp_path / "s")
    assert TaskStats.load(tmp_path / "s").features == "bottom_half"
    meta = tmp_path / "s" / "stats.json"
    meta.write_text(json.dumps({"labels": ["x", "y"]}))  # as stores before features were named
    assert TaskStats.load(tmp_path / "s").features == "middle"
    with pytest.raises(ValueError, match="different features"):
        GaussianRouter().fit({**stats, "d": renamed["a"]})


def test_route_value():
    route = Route(["a"], [1.0], 0.9)
    assert route.reason is None and route.tasks == ["a"]


def test_the_abstain_threshold_is_scipys_chi_square_quantile():
    """chi2_threshold computes the quantile without importing scipy.stats: the same number."""
    from scipy.stats import chi2

    from adapterhub_local.router import chi2_threshold

    torch.manual_seed(0)
    for dof, rate in ((3.0, 0.002), (40.0, 0.01), (900.0, 0.3)):
        distances = torch.distributions.Chi2(dof).sample((2000,)) * 1.7
        mean, var = distances.double().mean().item(), distances.double().var().item()
        scale, fitted = var / (2 * mean), 2 * mean**2 / var
        assert chi2_threshold(distances, rate) == pytest.approx(
            scale * chi2.ppf(1 - rate, fitted), rel=1e-12)


def test_distances_follow_a_refit_of_the_same_router(three_tasks):
    """The class means' own terms of the distances are kept between calls, and a refit (new
    means and precision) replaces them: the distances match the definition before and after."""
    stats = {t: s for t, (s, _) in three_tasks.items()}
    router = GaussianRouter()
    x = torch.cat([test for _, test in three_tasks.values()])
    for fit_on in (stats, {t: stats[t] for t in ("a", "b")}):
        router.fit(fit_on)
        for _ in range(2):  # computed, then kept
            diff = x[:, None, :] - router.means_[None]
            direct = torch.einsum("ncd,de,nce->nc", diff, router.precision_, diff)
            torch.testing.assert_close(router.class_distances(x), direct, rtol=1e-4, atol=1e-3)


# Word evidence (lexical.py): tasks whose features look alike, told apart by their words.

VOCABULARY = 50


def word_task(words: list[int], labels: list[str], seed: int, n=60) -> tuple:
    """(stats with grams, test features, test grams) of a task whose features sit where every
    such task's do (one cluster per class, the same for all), and whose texts draw their word
    pieces from `words` half of the time, else from the whole vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    space = VOCABULARY + lexical.BIGRAM_BUCKETS

    def texts(count: int) -> list[list[int]]:
        out = []
        for _ in range(count):
            own = torch.tensor(words)[torch.randint(len(words), (6,), generator=gen)]
            common = torch.randint(VOCABULARY, (6,), generator=gen)
            out.append(lexical.text_grams(torch.cat([own, common]).tolist(), VOCABULARY, set()))
        return out

    centers = [axis(0), axis(1)][: len(labels)]
    fit = torch.cat([cluster(c, n, 1.0, seed + i) for i, c in enumerate(centers)])
    held = torch.cat([cluster(c, 20, 1.0, seed + 100 + i) for i, c in enumerate(centers)])
    test = torch.cat([cluster(c, 30, 1.0, seed + 200 + i) for i, c in enumerate(centers)])
    y = [i for i in range(len(centers)) for _ in range(n)]
    stats = task_stats(fit, y, labels, held, grams=texts(len(fit)), calibration_grams=texts(len(held)),
                       gram_space=space)
    return stats, test, texts(len(test))


@pytest.fixture(scope="module")
def wordy_tasks():
    return {"a": word_task([1, 2, 3, 4], ["x", "y"], seed=0),
            "b": word_task([5, 6, 7, 8], ["x", "y"], seed=10)}


def test_words_tell_apart_tasks_whose_features_cannot(wordy_tasks):
    router = GaussianRouter().fit({t: s for t, (s, _, _) in wordy_tasks.items()})
    assert router.reads_words and router.words_weight_ > 0
    for task, (_, test, grams) in wordy_tasks.items():
        with_words = [r.tasks[:1] for r in router.route(test, grams=grams)]
        features_only = [r.tasks[:1] for r in router.route(test)]
        assert with_words.count([task]) / len(test) >= 0.95
        assert features_only.count([task]) / len(test) <= 0.8


def test_words_that_say_nothing_are_left_out():
    same = {"a": word_task(list(range(VOCABULARY)), ["x", "y"], seed=0),
            "b": word_task(list(range(VOCABULARY)), ["x", "y"], seed=10)}
    router = GaussianRouter().fit({t: s for t, (s, _, _) in same.items()})
    assert not router.reads_words and router.words_weight_ == 0.0


def test_naive_bayes_scores_are_the_log_likelihood_of_a_texts_grams():
    """The sparse scoring equals the plain formula: every gram of the text, seen or not, at
    log((rows of the class holding it + s) / (the class's gram total + s x grams))."""
    space, s = 30, lexical.SMOOTHING
    first = lexical.class_counts([[1, 2], [2, 3], [4]], [0, 0, 1])
    second = lexical.class_counts([[3, 29], [3]], [1, 1])  # its class 0 holds no rows
    model = lexical.NaiveBayes.fit([(first, 2), (second, 2)], space)
    dense = torch.zeros(4, space, dtype=torch.float64)
    for shift, counts in ((0, first), (2, second)):
        for klass, gram, seen in counts.T.tolist():
            dense[shift + klass, gram] = seen
    log_p = ((dense + s) / (dense.sum(1, keepdim=True) + s * space)).log()
    texts = [[2, 3], [29], [0, 5, 6], []]
    expected = torch.stack([log_p[:, text].sum(1) for text in texts])
    torch.testing.assert_close(model.scores(texts), expected.float())


def test_gram_counts_add_up_and_travel_with_the_statistics(wordy_tasks, tmp_path):
    bags = [[1, 2], [2, 60], [2]]
    whole = lexical.class_counts(bags, [0, 1, 1])
    parts = torch.cat([lexical.class_counts(bags[:1], [0]), lexical.class_counts(bags[1:], [1, 1])], 1)
    assert sorted(whole.T.tolist()) == sorted(parts.T.tolist()) == [[0, 1, 1], [0, 2, 1], [1, 2, 2], [1, 60, 1]]
    stats = wordy_tasks["a"][0]
    stats.save(tmp_path / "s")
    loaded = TaskStats.load(tmp_path / "s")
    assert torch.equal(loaded.grams, stats.grams) and loaded.gram_space == stats.gram_space
    assert loaded.calibration_grams == stats.calibration_grams
    router = GaussianRouter().fit({t: s for t, (s, _, _) in wordy_tasks.items()})
    router.save(tmp_path / "r", {"a": 1, "b": 1})
    again = GaussianRouter.load(tmp_path / "r")
    test, grams = wordy_tasks["b"][1], wordy_tasks["b"][2]
    assert again.words_weight_ == router.words_weight_
    assert torch.equal(again.task_probabilities(test, grams), router.task_probabilities(test, grams))


def test_statistics_without_grams_route_by_features_alone(wordy_tasks, three_tasks):
    """Stores made before word evidence keep routing as they did, and a router over tasks of
    both kinds reads no words rather than words of some tasks only."""
    old = {t: s for t, (s, _) in three_tasks.items()}
    assert not GaussianRouter().fit(old).reads_words
    plain = TaskStats(**{**vars(wordy_tasks["a"][0]), "grams": None, "calibration_grams": None})
    assert not GaussianRouter().fit({"a": plain, "b": wordy_tasks["b"][0]}).reads_words
