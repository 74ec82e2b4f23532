"""How noisy each figure is: the bootstrap intervals, the paired comparisons, McNemar's test, and the blend weight
that falls back to equal weights when the validation split cannot tell the weights apart (issue 27)."""

import math

import numpy as np
import pytest
from sklearn import metrics

import sentiment_analysis as sa

CLASSES = ("negative", "positive")


def two_columns(positive):
    return np.stack([1 - positive, positive], axis=1)


def wilson(right, rows, z=1.959964):
    """Wilson's score interval for a proportion."""
    share = right / rows
    centre = (share + z * z / (2 * rows)) / (1 + z * z / rows)
    half = z * math.sqrt(share * (1 - share) / rows + z * z / (4 * rows * rows)) / (1 + z * z / rows)
    return centre - half, centre + half


def test_the_accuracy_interval_of_90_right_of_100_is_a_fixed_bootstrap_close_to_wilsons():
    right = (np.arange(100) < 90).astype(float)
    interval = sa.mean_interval(right)
    # The same bootstrap written out as a loop: rows drawn with replacement, BOOTSTRAP_RESAMPLES times, seed fixed.
    generator = np.random.default_rng(sa.BOOTSTRAP_SEED)
    draws = [right[generator.integers(0, 100, size=100)].mean() for _ in range(sa.BOOTSTRAP_RESAMPLES)]
    assert interval == [round(float(bound), 4) for bound in np.percentile(draws, [2.5, 97.5])]
    low, high = wilson(90, 100)  # 0.8256 to 0.9448
    assert abs(interval[0] - low) < 0.02 and abs(interval[1] - high) < 0.02
    assert interval[0] < 0.9 < interval[1]
    # Repeatable: the same rows give the same interval.
    assert sa.mean_interval(right) == interval


def test_each_drawn_figure_is_scikit_learns_figure_on_that_draw():
    generator = np.random.default_rng(3)
    labels = generator.integers(0, 2, 300)
    positive = np.round(np.clip(labels * 0.3 + generator.random(300) * 0.7, 0, 1), 1)  # many ties
    counts = next(sa.bootstrap_draws(300))[:5]
    for row in counts:
        rows = np.repeat(np.arange(300), row.astype(int))
        auc = sa.drawn_auc(row[None, :], labels == 1, positive)[0]
        assert auc == pytest.approx(metrics.roc_auc_score(labels[rows], positive[rows]), abs=1e-9)
        f1 = sa.drawn_f1(row[None, :], labels == 1, positive >= 0.5)[0]
        assert f1 == pytest.approx(metrics.f1_score(labels[rows], positive[rows] >= 0.5), abs=1e-6)


def test_intervals_hold_their_figure_and_several_classes_use_macro_f1():
    generator = np.random.default_rng(4)
    labels = generator.integers(0, 3, 400)
    probabilities = generator.dirichlet(np.ones(3), 400)
    probabilities[np.arange(400), labels] += 0.6
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    names = ("a", "b", "c")
    drawn = sa.bootstrap_figures(labels, {"lstm": probabilities}, names)
    assert set(drawn["lstm"]) == {"accuracy", "f1_macro", "roc_auc"}
    scores = sa.compute_metrics(labels, probabilities, names)
    for figure, values in drawn["lstm"].items():
        low, high = sa.percentile_interval(values)
        assert len(values) == sa.BOOTSTRAP_RESAMPLES and low < scores[figure] < high


def test_mcnemar_on_a_hand_made_table():
    # 1 row only the first model gets right, 9 only the second: P(X <= 1) for X ~ Bin(10, 1/2) is 11/1024.
    assert sa.mcnemar_p_value(1, 9) == pytest.approx(22 / 1024, rel=1e-12)
    assert sa.mcnemar_p_value(9, 1) == sa.mcnemar_p_value(1, 9)
    assert sa.mcnemar_p_value(5, 5) == 1.0 and sa.mcnemar_p_value(0, 0) == 1.0
    assert sa.mcnemar_p_value(0, 6) == pytest.approx(2 / 64)
    # Large tables stay exact to rounding: 450 against 550 of 1,000.
    exact = 2 * sum(math.comb(1000, k) for k in range(451)) / 2 ** 1000
    assert sa.mcnemar_p_value(450, 550) == pytest.approx(exact, rel=1e-9)


def test_a_paired_comparison_counts_the_rows_only_one_model_gets_right():
    labels = np.arange(200) % 2
    truth = two_columns(labels * 0.8 + 0.1)
    first = truth.copy()
    first[:30] = truth[:30, ::-1]  # wrong on rows 0-29
    second = truth.copy()
    second[20:80] = truth[20:80, ::-1]  # wrong on rows 20-79
    comparison = sa.compare_models(labels, first, second, ("lstm", "baseline"), "test")
    assert (comparison.first_only, comparison.second_only) == (50, 20)
    assert comparison.difference == pytest.approx(0.15)
    assert comparison.p_value == sa.mcnemar_p_value(50, 20) and not comparison.level
    assert comparison.words().startswith("ahead by 15.0 points (")
    assert comparison.interval[0] > 0 and comparison.interval[0] < 0.15 < comparison.interval[1]
    behind = sa.compare_models(labels, second, first, ("baseline", "lstm"), "test")
    assert behind.words().startswith("behind by 15.0 points (")
    same = sa.compare_models(labels, first, first, ("lstm", "baseline"), "test")
    assert same.level and same.interval == [0.0, 0.0] and same.words().startswith("level: the difference is within")
    # 9 rows to 3 of 40: the bootstrap's interval (percentiles of few rows) may leave out zero, McNemar's exact
    # p = 0.146 does not: level.
    few = np.arange(40) % 2
    right = two_columns(few * 0.8 + 0.1)
    a, b = right.copy(), right.copy()
    a[:3], b[3:12] = right[:3, ::-1], right[3:12, ::-1]
    close = sa.compare_models(few, a, b, ("lstm", "baseline"), "test")
    assert (close.first_only, close.second_only) == (9, 3) and close.p_value == pytest.approx(0.146, abs=1e-3)
    assert close.level


def test_level_needs_both_the_interval_and_mcnemar_to_call_a_difference():
    # 5 rows of 400 only the first model gets right: every bootstrap draw of so many rows almost surely holds one
    # of them, so the interval leaves out zero, but McNemar's exact p = 2 / 2**5 = 0.0625: level by McNemar alone.
    labels = np.arange(400) % 2
    right = two_columns(labels * 0.8 + 0.1)
    second = right.copy()
    second[:5] = right[:5, ::-1]
    by_mcnemar = sa.compare_models(labels, right, second, ("lstm", "baseline"), "validation")
    assert (by_mcnemar.first_only, by_mcnemar.second_only) == (5, 0) and by_mcnemar.interval[0] > 0
    assert by_mcnemar.p_value == pytest.approx(0.0625) and by_mcnemar.level
    second[5] = right[5, ::-1]  # 6 rows: p = 0.031, and the interval still leaves out zero: ahead
    assert not sa.compare_models(labels, right, second, ("lstm", "baseline"), "validation").level
    # The reverse, an interval that holds zero beside p < 0.05 (the exact test is the stricter one on real rows,
    # so it is written out): level by the interval alone.
    by_interval = sa.Comparison("lstm", "baseline", "validation", 0.02, [-0.001, 0.04], 0.01, 12, 2)
    assert by_interval.level and by_interval.words().startswith("level")
    both = sa.Comparison("lstm", "baseline", "validation", 0.02, [0.001, 0.04], 0.01, 12, 2)
    assert not both.level and both.words().startswith("ahead by 2.0 points")


def test_the_table_and_the_evaluation_carry_intervals_and_comparisons():
    labels = np.arange(400) % 2
    generator = np.random.default_rng(5)
    lstm = two_columns(np.clip(labels * 0.4 + generator.random(400) * 0.6, 0, 1))
    baseline = two_columns(np.clip(labels * 0.2 + generator.random(400) * 0.8, 0, 1))
    test = sa.LabelledTexts(np.array(["x"] * 400, dtype=object), labels)
    evaluation = sa.evaluate(test, CLASSES, {"lstm": lstm, "baseline": baseline})
    for name in ("lstm", "baseline"):
        for figure in ("accuracy", "f1", "roc_auc"):
            low, high = evaluation.scores[name][f"{figure}_interval"]
            assert low <= evaluation.scores[name][figure] <= high
    accuracy, (low, high) = evaluation.scores["lstm"]["accuracy"], evaluation.scores["lstm"]["accuracy_interval"]
    assert f"{accuracy:.4f} ({low:.4f}–{high:.4f})" in evaluation.table.splitlines()[1]
    [comparison] = evaluation.comparisons
    assert (comparison.first, comparison.second, comparison.split) == ("lstm", "baseline", "test")
    assert comparison.difference == pytest.approx(accuracy - evaluation.scores["baseline"]["accuracy"])
    # A blend is compared with each of its parts.
    blend = sa.blend_probabilities(0.5, lstm, baseline)
    evaluation = sa.evaluate(test, CLASSES, {"blend": blend, "baseline": baseline, "lstm": lstm})
    assert [(c.first, c.second) for c in evaluation.comparisons] == [("lstm", "baseline"), ("blend", "baseline"),
                                                                     ("blend", "lstm")]


def test_an_auto_blend_falls_back_to_equal_weights_when_validation_cannot_tell_them_apart():
    config = sa.TrainConfig(blend_weight="auto")
    generator = np.random.default_rng(6)
    # Ten reviews, each model surer on every other one: the lowest log loss is at 0.7, but on so few rows equal
    # weights are as good within noise.
    labels = np.arange(10) % 2
    right = lambda chance: two_columns(np.where(labels == 1, chance, 1 - chance))
    neural, baseline = right(np.array([0.97, 0.6] * 5)), right(np.array([0.6, 0.9] * 5))
    assert sa.choose_blend_weight(labels, neural, baseline) == 0.7
    blend = sa.choose_blend(config.blend_weight, config.arch, labels, neural, baseline)
    assert blend.weight == sa.EQUAL_BLEND_WEIGHT and blend.reason.startswith("equal weights")
    # 2,000 reviews, the neural model sure and right, the baseline a coin: the log-loss weight stands.
    labels = np.arange(2000) % 2
    neural = two_columns(np.where(labels == 1, 0.9, 0.1))
    noise = two_columns(generator.random(2000))
    blend = sa.choose_blend(config.blend_weight, config.arch, labels, neural, noise)
    assert blend.weight == sa.choose_blend_weight(labels, neural, noise) == 1.0
    assert blend.reason == "the lowest validation log loss"


def test_the_learning_curve_figure_is_a_real_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    curve = [{"share": 0.1, "training_rows": 72, "validation_accuracy": 0.6, "interval": [0.45, 0.72]},
             {"share": 1.0, "training_rows": 720, "validation_accuracy": 0.8, "interval": [0.7, 0.9]}]
    path = tmp_path / sa.LEARNING_CURVE_FIGURE
    sa._save_figure(sa.plot_learning_curve(curve), path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
