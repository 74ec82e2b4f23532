"""Small data: the training plan that adapts to the data size, the advice on what to trust, the baseline's
learning curve, gensim's downloader names for --embeddings, and an explicit --epochs honoured."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CSV, TINY_FLAGS, assert_user_error, run_main, split
from test_pretrained import vectors, write_vec


def plan_for(rows, replicas=1, **settings):
    import sentiment_analysis as sa

    lengths = np.random.default_rng(rows).integers(20, 501, rows)
    config = sa.TrainConfig(**settings)
    return sa.plan_training(sa.PlanAsked.of(config), lengths, replicas, config.max_length), lengths


def batches(lengths, batch_size, max_length=500):
    import sentiment_analysis as sa

    return sa.count_batches(lengths, batch_size, sa.bucket_boundaries(max_length, len(lengths), batch_size))


def test_the_full_imdb_size_keeps_the_cards_recipe():
    import sentiment_analysis as sa

    plan, lengths = plan_for(35_693)
    assert (plan.batch_size, plan.epochs, plan.patience, plan.word2vec_epochs) == (128, 4, 1, 5)
    assert plan.steps_per_epoch == batches(lengths, 128)
    assert plan.planned_steps == 4 * plan.steps_per_epoch >= sa.MIN_STEPS
    best, _ = plan_for(35_693, **sa.PRESETS["best"])
    assert (best.batch_size, best.epochs, best.patience) == (128, 6, 1)


def test_large_data_bounds_word2vec_by_its_token_budget(monkeypatch):
    """Above WORD2VEC_MAX_TOKENS over all passes: fewer passes, then one pass over a seeded sample of the texts,
    which is what Word2Vec is given."""
    import sentiment_analysis as sa

    plan, lengths = plan_for(100_000)  # about 26M tokens: 3 passes instead of 5
    assert plan.word2vec_epochs == sa.WORD2VEC_MAX_TOKENS // lengths.sum() == 3 and plan.word2vec_share == 1.0
    assert "Word2Vec 3 passes over" in plan.reason and "sample" not in plan.reason
    plan, lengths = plan_for(400_000)  # about 104M tokens: one pass over a sample of them
    assert plan.word2vec_epochs == 1 and plan.word2vec_share == pytest.approx(sa.WORD2VEC_MAX_TOKENS / lengths.sum())
    assert f"a {plan.word2vec_share:.0%} sample of {lengths.sum()} tokens" in plan.reason
    given = []
    monkeypatch.setattr(sa, "word2vec_matrix", lambda ids, *args: given.append(ids) or np.zeros((3, 4)))
    derived = sa.Derived("word2vec", 4, 500)
    ids = sa.ReviewIds.from_padded(np.arange(1, 1001, dtype=np.int32)[:, None])
    half = sa.TrainingPlan(128, 8, 4, 1, 1, "test", word2vec_share=0.5)
    sa.starting_embedding(derived, 42, ids, ids.take(np.arange(0)), ["", "[UNK]", "a"], half)
    chosen = np.concatenate(list(given[0]))  # the sentences Word2Vec reads, one review's ids each
    assert len(given[0]) == 500 and len(set(chosen)) == 500 and list(chosen) == sorted(chosen)
    sa.starting_embedding(derived, 42, ids, ids.take(np.arange(0)), ["", "[UNK]", "a"], half)
    np.testing.assert_array_equal(chosen, np.concatenate(list(given[1])))  # seeded
    # With unlabelled texts the sample is drawn from both, the training split's reviews first.
    sa.starting_embedding(derived, 42, ids.take(np.arange(600)), ids.take(np.arange(600, 1000)),
                          ["", "[UNK]", "a"], half)
    np.testing.assert_array_equal(chosen, np.concatenate(list(given[2])))


@pytest.mark.parametrize("rows", [720, 2_157, 7_186])
def test_small_data_gets_small_batches_and_at_least_the_minimum_of_steps(rows):
    import sentiment_analysis as sa

    plan, lengths = plan_for(rows)
    assert plan.batch_size == sa.SMALL_BATCH_SIZE
    # Word2Vec passes over the small text until it has seen about WORD2VEC_TOKENS tokens.
    assert plan.word2vec_epochs == min(sa.MAX_WORD2VEC_EPOCHS, math.ceil(sa.WORD2VEC_TOKENS / lengths.sum()))
    assert plan.word2vec_epochs > sa.WORD2VEC_EPOCHS and f"Word2Vec {plan.word2vec_epochs} passes" in plan.reason
    assert plan.steps_per_epoch == batches(lengths, sa.SMALL_BATCH_SIZE)
    assert plan.epochs == max(4, math.ceil(sa.MIN_STEPS / plan.steps_per_epoch))
    assert sa.MIN_STEPS <= plan.planned_steps < sa.MIN_STEPS + plan.steps_per_epoch or plan.epochs == 4
    assert plan.patience == max(1, math.ceil(sa.PATIENCE_STEPS / plan.steps_per_epoch))
    assert str(plan.epochs) in plan.reason and str(sa.SMALL_BATCH_SIZE) in plan.reason


def test_the_plan_is_capped_for_very_small_data():
    import sentiment_analysis as sa

    plan, _ = plan_for(40)
    assert plan.epochs == sa.MAX_PLANNED_EPOCHS and "the most planned" in plan.reason


def test_flags_given_are_taken_as_given():
    plan, lengths = plan_for(720, epochs=2, batch_size=64, patience=1)
    assert (plan.epochs, plan.batch_size, plan.patience) == (2, 64, 1)
    assert plan.steps_per_epoch == batches(lengths, 64) and plan.planned_steps == 2 * plan.steps_per_epoch
    assert "2 epochs as given" in plan.reason
    # Several replicas take --batch-size each: the steps are counted with the global batch.
    plan, lengths = plan_for(720, replicas=2, batch_size=16)
    assert plan.steps_per_epoch == batches(lengths, 32)


def as_probabilities(accuracy, rows=100):
    """Two-class probabilities for `rows` reviews (labels alternating) that are right on the first accuracy * rows."""
    labels = np.arange(rows) % 2
    right = np.arange(rows) < round(accuracy * rows)
    positive = np.where(right, labels, 1 - labels).astype(float) * 0.8 + 0.1
    return np.stack([1 - positive, positive], axis=1)


def check(neural_accuracy, baseline_accuracy, curve=(), half_accuracy=None, rows=100):
    """A ValidationCheck of `rows` reviews whose models reach these accuracies (each right on the first rows, so the
    more accurate one is right wherever the other is)."""
    import sentiment_analysis as sa

    return sa.ValidationCheck(np.arange(rows) % 2, as_probabilities(neural_accuracy, rows),
                              None if baseline_accuracy is None else as_probabilities(baseline_accuracy, rows),
                              list(curve), None if half_accuracy is None else as_probabilities(half_accuracy, rows))


def test_the_advice_says_plainly_when_the_baseline_is_better():
    import sentiment_analysis as sa

    notes = sa.advice(check(0.64, 0.87), "lstm", None)
    assert len(notes) == 1
    assert "The baseline is better on this data: 0.8700 against 0.6400" in notes[0]
    assert "--preset best" in notes[0] and "validation split" in notes[0]
    assert "the lstm is behind by 23.0 points" in notes[0] and "McNemar p = 2.4e-07" in notes[0]  # 2 / 2**23
    # A blend that the baseline still beats points to the baseline's own figures, by the blend's accuracy.
    blend = sa.Blend(0.9, {"lstm": 0.64, "baseline": 0.87, "blend": 0.64})
    notes = sa.advice(check(0.64, 0.87), "lstm", blend)
    assert "0.8700 against 0.6400 accuracy for the blend" in notes[0] and "--preset best" not in notes[0]


def test_the_advice_judges_the_blend_that_is_saved_whatever_its_weight():
    import sentiment_analysis as sa

    # The baseline alone beats the lstm by 30 points; the blend of a fixed 0.9 (the weight given, not chosen)
    # still follows the lstm on most rows: the note must be about that blend, which is what the run saves.
    labels = np.arange(200) % 2
    neural, baseline = as_probabilities(0.6, 200), as_probabilities(0.9, 200)
    fixed = sa.Blend(0.9, None)
    blended = sa.blend_probabilities(0.9, neural, baseline)
    notes = sa.advice(sa.ValidationCheck(labels, neural, baseline, []), "lstm", fixed)
    assert len(notes) == 1 and "for the blend on the validation split" in notes[0], notes
    assert f"against {sa.accuracy_of(labels, blended):.4f} accuracy for the blend" in notes[0]
    assert "the lstm" not in notes[0]
    # A blend of weight 1 is the neural model itself, and is named so.
    notes = sa.advice(sa.ValidationCheck(labels, neural, baseline, []), "lstm", sa.Blend(1.0, None))
    assert "for the lstm" in notes[0]


def test_the_advice_calls_models_level_when_the_difference_is_within_noise():
    import sentiment_analysis as sa

    # One review of 100 apart, or none: level, and the note names the cheaper model instead of a winner.
    for neural, baseline in ((0.90, 0.91), (0.91, 0.90), (0.90, 0.90)):
        notes = sa.advice(check(neural, baseline), "lstm", None)
        assert len(notes) == 1 and "The baseline is better" not in notes[0]
        assert notes[0].startswith("The lstm and the baseline are level on the validation split")
        assert "within noise" in notes[0] and "The baseline is the cheaper one to use" in notes[0]
    # Both models agree on every validation row: a difference of exactly zero, McNemar p = 1.
    assert "+0.0 points, +0.0 to +0.0; McNemar p = 1" in sa.advice(check(0.9, 0.9), "lstm", None)[0]
    # The same gap of 3 points on 100 reviews is noise; on 2,000 reviews (60 of them) it is not.
    assert "level" in sa.advice(check(0.87, 0.90), "lstm", None)[0]
    assert "The baseline is better" in sa.advice(check(0.87, 0.90, rows=2000), "lstm", None)[0]


def test_no_advice_when_the_model_is_ahead_beyond_noise_or_there_is_no_baseline():
    import sentiment_analysis as sa

    assert sa.advice(check(0.95, 0.70), "lstm", None) == []
    assert sa.advice(check(0.90, None), "lstm", None) == []
    # A blend that is all baseline (weight 0) is the baseline: nothing to compare.
    blend = sa.Blend(0.0, {"lstm": 0.5, "baseline": 0.9, "blend": 0.9})
    assert sa.advice(check(0.5, 0.9), "lstm", blend) == []


def test_the_advice_reads_the_baselines_learning_curve():
    import sentiment_analysis as sa

    rising = [{"share": 0.5, "training_rows": 50, "validation_accuracy": 0.80},
              {"share": 1.0, "training_rows": 100, "validation_accuracy": 0.90}]
    notes = sa.advice(check(0.99, 0.90, rising, half_accuracy=0.80), "lstm", None)
    assert len(notes) == 1 and "More labelled data would likely help" in notes[0] and "0.1000" in notes[0]
    assert "ahead by 10.0 points" in notes[0]
    # A gain of 2 reviews of 100 is within noise: no advice, though it passes the 1-point floor.
    small = [dict(rising[0], validation_accuracy=0.82), dict(rising[1], validation_accuracy=0.84)]
    assert sa.advice(check(0.95, 0.84, small, half_accuracy=0.82), "lstm", None) == []
    # Beyond noise but below the floor (10 reviews of 2,000): no advice either.
    notes = sa.advice(check(0.99, 0.85, rising, half_accuracy=0.845, rows=2000), "lstm", None)
    assert notes == []


def test_the_baselines_learning_curve_refits_on_shares_of_the_training_split(monkeypatch):
    import sentiment_analysis as sa

    config = sa.TrainConfig(data=str(TINY_CSV))
    splits = split(sa.load_dataset(config), config)
    train = sa.standardized_strings(splits.train.texts, sa.standardize_text)
    validation = sa.standardized_strings(splits.validation.texts, sa.standardize_text)
    baseline = sa.fit_baseline(train, splits.train.labels, sa.BaselineRecipe.of(config))
    monkeypatch.setattr(sa, "BASELINE_CHUNK", 7)  # the validation texts scored a few at a time: the same
    whole_split, curve, half = sa.baseline_learning_curve(baseline, train, splits.train.labels, splits.validation,
                                                          sa.standardize_text, sa.BaselineRecipe.of(config))
    np.testing.assert_array_equal(whole_split, baseline.predict_proba(validation))
    rows = len(splits.train.labels)
    assert [point["share"] for point in curve] == [0.1, 0.25, 0.5, 1.0]
    assert [point["training_rows"] for point in curve] == [round(0.1 * rows), round(0.25 * rows),
                                                           round(0.5 * rows), rows]
    whole = np.mean(sa.predicted_labels(baseline.predict_proba(validation)) == splits.validation.labels)
    assert curve[-1]["validation_accuracy"] == round(float(whole), 4)
    # The half point is a real refit: the baseline fitted on that stratified half scores the same.
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(rows), train_size=round(0.5 * rows), stratify=splits.train.labels,
                                 random_state=config.seed)
    refit = sa.fit_baseline([train[i] for i in chosen], splits.train.labels[chosen], sa.BaselineRecipe.of(config))
    accuracy = np.mean(sa.predicted_labels(refit.predict_proba(validation)) == splits.validation.labels)
    assert curve[2]["validation_accuracy"] == round(float(accuracy), 4)
    np.testing.assert_array_equal(half, refit.predict_proba(validation))  # what the advice compares with
    for point in curve:  # each point's 95% interval holds its accuracy
        assert point["interval"][0] <= point["validation_accuracy"] <= point["interval"][1]


@pytest.mark.slow
def test_the_report_shows_the_plan_the_notes_and_the_learning_curve(trained_dir):
    import html

    metrics = json.loads((trained_dir / "metrics.json").read_text())
    training = metrics["training"]
    assert training["planned_epochs"] == 1 and training["planned_steps"] == training["steps_per_epoch"]
    assert "1 epochs as given" in training["plan"]
    assert training["word2vec_epochs"] == 200  # the most: the tiny split has few tokens
    assert set(metrics["validation"]["accuracy"]) == {"neural", "baseline"}
    curve = metrics["validation"]["baseline_learning_curve"]
    assert [point["share"] for point in curve] == [0.1, 0.25, 0.5, 1.0]
    page = (trained_dir / "report.html").read_text()
    assert "The baseline&#x27;s learning curve" in page or "The baseline's learning curve" in page
    for point in curve:
        assert f"<td class=\"number\">{point['training_rows']}</td>" in page
    # The small-data note is always there for this tiny split; every note of the run is on the page.
    assert any(note.startswith("Small data:") for note in metrics["notes"])
    for note in metrics["notes"]:
        assert html.escape(note) in page
    # The advice speaks by the paired comparison on validation: better beyond noise, or level.
    comparison = metrics["validation"]["comparison"]
    assert (comparison["first"], comparison["second"], comparison["split"]) == ("neural", "baseline", "validation")
    better = not comparison["level"] and comparison["difference"] < 0
    assert ("The baseline is better on this data" in page) == better
    assert any("and the baseline are level on the validation split" in note for note in metrics["notes"]) \
        == comparison["level"]
    # Every headline figure carries its interval, in metrics.json, the terminal's table and the page.
    for model in ("test", "baseline"):
        for figure in ("accuracy", "f1", "roc_auc"):
            low, high = metrics[model][f"{figure}_interval"]
            assert low <= metrics[model][figure] <= high
    low, high = metrics["test"]["accuracy_interval"]
    assert f"{metrics['test']['accuracy']:.4f} ({low:.4f}–{high:.4f})" in page
    assert "1000 draws with seed 0" in metrics["intervals"]
    [test_comparison] = metrics["comparisons"]
    assert (test_comparison["first"], test_comparison["second"]) == ("lstm", "baseline")
    assert "Paired comparisons (test split)" in page and html.escape(test_comparison["words"]) in page
    report_text = (trained_dir / "classification_report.txt").read_text()
    assert f"({low:.4f}–{high:.4f})" in report_text
    # The learning curve as a picture, with the intervals of its table.
    assert (trained_dir / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
    assert 'alt="learning_curve.png"' in page
    for point in curve:
        assert point["interval"][0] <= point["validation_accuracy"] <= point["interval"][1]


@pytest.mark.slow
def test_an_explicit_epochs_is_honoured(tmp_path):
    flags = [flag for flag in TINY_FLAGS if flag not in ("--epochs", "1")]
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, *flags, "--epochs", "3", "--patience", "3",
                      "--no-baseline")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["training"]["planned_epochs"] == metrics["training"]["epochs_run"] == 3
    assert "3 epochs as given" in metrics["training"]["plan"]
    assert "Plan: 3 epochs of" in result.stdout


@pytest.fixture
def stub_downloader(monkeypatch, tmp_path):
    """gensim's downloader without the network: a known name gives a small word2vec-format file."""
    import gensim.downloader

    path = tmp_path / "gensim-data" / "glove-wiki-gigaword-100" / "glove-wiki-gigaword-100.gz"
    path.parent.mkdir(parents=True)
    plain = tmp_path / "vectors.vec"
    write_vec(plain, vectors())
    import gzip

    path.write_bytes(gzip.compress(plain.read_bytes()))
    asked = []

    def load(name, return_path=False):
        asked.append((name, return_path))
        if name == "glove-wiki-gigaword-100":
            return str(path)
        if name == "offline-vectors-50":
            raise OSError("Temporary failure in name resolution")
        raise ValueError("Incorrect model/corpus name")

    monkeypatch.setattr(gensim.downloader, "load", load)
    return path, asked


@pytest.mark.slow
def test_a_gensim_downloader_name_is_fetched_and_used(stub_downloader, tmp_path):
    path, asked = stub_downloader
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path / "out", *TINY_FLAGS, "--no-baseline",
                      "--embeddings", "glove-wiki-gigaword-100")
    assert result.returncode == 0, result.stderr[-2000:]
    assert asked == [("glove-wiki-gigaword-100", True)]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["embeddings"] == str(path)
    assert metrics["config"]["embedding_dim"] == 6
    assert metrics["data"]["embedding_coverage"]["vocabulary_covered"] > 0
    assert metrics["started_from"]["embeddings"] == "glove-wiki-gigaword-100"  # the name asked for, and its file
    assert metrics["started_from"]["vectors"] == str(Path(path).resolve())


@pytest.mark.parametrize("name, fragments", [
    ("no-such-vectors-7", ["no-such-vectors-7", "neither a file nor a name"]),
    ("offline-vectors-50", ["offline-vectors-50", "could not fetch", "give the file"]),
])
def test_a_bad_downloader_name_is_one_line_before_any_data_is_read(stub_downloader, tmp_path, name, fragments):
    result = run_main("--data", tmp_path / "missing.csv", "--output-dir", tmp_path / "out", "--embeddings", name)
    assert_user_error(result, *fragments)


def test_a_missing_file_is_not_taken_for_a_downloader_name(tmp_path):
    result = run_main("--data", TINY_CSV, "--embeddings", str(tmp_path / "glove.6B.50d.txt"))
    assert_user_error(result, "--embeddings must be word2vec, random, an existing word-vector file")


def test_an_auto_blend_less_accurate_than_a_part_gives_that_part_all_the_weight(monkeypatch):
    import sentiment_analysis as sa

    labels = np.arange(100) % 2
    # The baseline is right on every review, unsure; the neural model is sure, and wrong on 40 of them.
    baseline = np.where(labels == 1, 0.6, 0.4)
    wrong = np.arange(100) < 40
    neural = np.where(wrong, 1 - labels, labels) * 0.98 + 0.01
    as_classes = lambda positive: np.stack([1 - positive, positive], axis=1)
    config = sa.TrainConfig(blend_weight="auto")
    monkeypatch.setattr(sa, "choose_blend_weight", lambda *arrays: 0.5)  # a log-loss choice that mixes the two
    blend = sa.choose_blend(config.blend_weight, config.arch, labels, as_classes(neural), as_classes(baseline))
    assert blend.weight == 0.0
    assert blend.validation_accuracy == {"lstm": 0.6, "baseline": 1.0, "blend": 1.0}
    # When the blend is at least as accurate as both parts, the log-loss weight stands.
    blend = sa.choose_blend(config.blend_weight, config.arch, labels, as_classes(baseline), as_classes(baseline))
    assert blend.weight == 0.5 and blend.validation_accuracy["blend"] == 1.0
