"""The training loop's early stopping and Ctrl-C, on a tiny classifier whose validation losses are scripted: the
run stops when it should and keeps the weights of its best epoch, compared with the weights each epoch ended with."""

import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import sentiment_analysis as sa


def scripted_training(validation_losses, interrupt_in_epoch=None):
    """A tiny classifier trained through sa.train with its real training step and a validation step that reports
    `validation_losses` (one per epoch) and records the weights it sees: the weights of each epoch's end. With
    `interrupt_in_epoch`, Ctrl-C (KeyboardInterrupt) comes in that epoch's first training step."""
    sa.keras.utils.set_random_seed(3)
    config = sa.TrainConfig(embedding_dim=4, units=3, spatial_dropout=0.0, learning_rate=0.05)
    strategy = tf.distribute.get_strategy()
    classifier = sa.build_classifier(config, 30)
    epochs = len(validation_losses)
    plan = sa.TrainingPlan(4, 2, epochs, 2, 0, "test")
    optimizer = sa.build_optimizer(sa.OptimizerRecipe.of(config), plan)
    optimizer.build(classifier.trainable_variables)
    real = sa.build_step_functions(classifier, optimizer, strategy)
    token_ids = np.random.default_rng(0).integers(1, 30, (8, 6)).astype(np.int32)
    labels = (np.arange(8) % 2).astype(np.float32)
    batches = tf.data.Dataset.from_tensor_slices((token_ids, labels, np.ones(8, np.float32))).batch(4)
    seen, steps_run = [], []

    def train_step(iterator):
        if interrupt_in_epoch is not None and len(steps_run) == 2 * (interrupt_in_epoch - 1):
            raise KeyboardInterrupt
        steps_run.append(1)
        return real.train(iterator)

    def validation_step(iterator):
        next(iterator)
        seen.append([weight.copy() for weight in classifier.get_weights()])
        return [tf.constant(validation_losses[len(seen) - 1] * 4.0), tf.constant(2.0), tf.constant(4.0)]

    inputs = types.SimpleNamespace(plan=plan, class_weights=None, validation_batches=batches.take(1),
                                   validation_steps=1, training_batches=lambda epoch: batches, share=sa.DataShare())
    state = sa.TrainingState(fingerprint={})
    result = sa.train(classifier, optimizer, strategy, inputs, state, Path(tempfile.mkdtemp()), False,
                      steps=sa.Steps(train_step, validation_step))
    return result, classifier, seen


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_keeps_the_best_epochs_weights():
    # Patience 2: the best epoch is 2; epochs 3 and 4 do not beat it, so the run stops before epoch 5.
    result, classifier, seen = scripted_training([0.6, 0.4, 0.5, 0.45, 0.1, 0.1])
    assert result.epochs_run == 4 and result.best_epoch == 2 and len(seen) == 4
    assert result.history["val_loss"] == pytest.approx([0.6, 0.4, 0.5, 0.45])
    assert any(not np.array_equal(a, b) for a, b in zip(seen[1], seen[3]))  # training went on after epoch 2
    for weight, best in zip(classifier.get_weights(), seen[1]):
        np.testing.assert_array_equal(weight, best)


@pytest.mark.slow
def test_ctrl_c_stops_training_and_keeps_the_best_weights_so_far():
    result, classifier, seen = scripted_training([0.5, 0.3, 0.4, 0.2], interrupt_in_epoch=4)
    assert result.interrupted and result.epochs_run == 3 and result.best_epoch == 2 and len(seen) == 3
    assert any(not np.array_equal(a, b) for a, b in zip(seen[1], seen[2]))
    for weight, best in zip(classifier.get_weights(), seen[1]):
        np.testing.assert_array_equal(weight, best)


def test_a_log_gets_a_progress_line_under_a_minute_apart_during_an_epoch(capsys):
    now = [0.0]
    progress = sa.StageProgress("", 100, "batches", first=10, terminal=False, clock=lambda: now[0], one="batch")
    for index in range(10, 100):
        now[0] += 2.0  # two seconds a batch
        progress(index + 1)
    lines = capsys.readouterr().out.splitlines()
    # A line after each 40 s (20 batches of a resumed epoch's 90), none at the epoch's last batch; under 90 s
    # left it says the seconds.
    assert lines == ["  30/100 batches, 2.00 s a batch, about 2 min left",
                     "  50/100 batches, 2.00 s a batch, about 2 min left",
                     "  70/100 batches, 2.00 s a batch, about 60 s left",
                     "  90/100 batches, 2.00 s a batch, about 20 s left"]


def test_a_row_of_short_stages_in_a_log_is_not_a_minute_of_silence(capsys, monkeypatch):
    now = [0.0]

    def clock():
        return now[0]

    # The last progress line of any stage came 35 s before this stage began: its check 6 s in prints one.
    monkeypatch.setattr(sa.StageProgress, "logged", {clock: -35.0})
    first = sa.StageProgress("tokenizing: ", 10, "texts", terminal=False, clock=clock)
    now[0] = 4.0
    first(1)
    assert capsys.readouterr().out == ""
    now[0] = 6.0
    first(2)
    assert capsys.readouterr().out.startswith("  tokenizing: 2/10 texts, ")
    # The next stage counts from that line, not from its own start.
    now[0] = 10.0
    second = sa.StageProgress("counting: ", 10, "texts", terminal=False, clock=clock)
    now[0] = 57.0
    second(1)
    assert capsys.readouterr().out.startswith("  counting: 1/10 texts, ")


def test_work_in_other_processes_gets_a_heartbeat_in_a_log(capsys, monkeypatch):
    import time

    monkeypatch.setattr(sa.StageProgress, "LOG_EVERY", 0.0)  # a line at every beat (each second)
    with sa.StageProgress.heartbeat("fitting baselines: ", 3, "baselines") as fitted:
        fitted(2)
        time.sleep(1.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines and lines[0].startswith("  fitting baselines: 2/3 baselines done, ") and lines[0].endswith("so far")


def test_a_terminal_gets_one_line_rewritten_and_cleared(capsys):
    now = [0.0]
    progress = sa.StageProgress("tokenizing: ", 10_000, "texts", terminal=True, clock=lambda: now[0])
    for done in range(1000, 10_001, 1000):
        now[0] += 1.0  # a thousand texts a second
        progress(done)
    progress.close()
    out = capsys.readouterr().out
    assert "\n" not in out and out.count("\r") == 10  # nine updates (none at the end) and the clearing
    assert "\r  tokenizing: 9000/10000 texts, 1000 texts a second, about 1 s left" in out


def test_a_rate_near_one_a_second_keeps_a_decimal(capsys):
    now = [0.0]
    progress = sa.StageProgress("", 1000, "batches", terminal=False, clock=lambda: now[0], one="batch")
    now[0] = 61.0
    progress(85)  # 0.72 s a batch: 1.4 batches a second, not "1 batches a second"
    assert capsys.readouterr().out.splitlines() == ["  85/1000 batches, 1.4 batches a second, about 11 min left"]


def test_the_baseline_shows_how_many_texts_its_features_have_read(capsys, monkeypatch):
    monkeypatch.setattr(sa.StageProgress, "LOG_EVERY", 0.0)  # a line at every check, not every minute
    texts = [f"word{index % 7} great film {index}" if index % 2 else f"word{index % 5} awful film {index}"
             for index in range(2500)]
    labels = np.arange(2500) % 2
    baseline = sa.fit_baseline(texts, labels, sa.BaselineRecipe())
    lines = [line for line in capsys.readouterr().out.splitlines() if "baseline features" in line
             and "done" not in line]  # (not the heartbeat's lines, if the fit takes a second)
    assert [line.split(",")[0] for line in lines] == ["  baseline features: 1000/2500 texts",
                                                      "  baseline features: 2000/2500 texts"]
    assert (baseline.predict(["word1 great film 3", "word2 awful film 4"]) == [1, 0]).all()


def test_the_baselines_features_say_they_go_on_after_the_last_text(capsys, monkeypatch):
    # After reading its texts the vectorizer sorts and prunes its n-grams, which on 100,000 texts took long
    # enough for a 65 s silence in a log: a heartbeat covers that tail.
    import time

    monkeypatch.setattr(sa.StageProgress, "LOG_EVERY", 0.0)  # a line at every beat (each second)
    real = sa.baseline_pipeline

    def slow_tail(recipe):
        pipeline = real(recipe)
        features = pipeline.steps[0][1]
        fit_transform = features.fit_transform
        features.fit_transform = lambda texts: (fit_transform(texts), time.sleep(1.5))[0]
        return pipeline

    monkeypatch.setattr(sa, "baseline_pipeline", slow_tail)
    texts = [f"word{index % 7} great film" if index % 2 else f"word{index % 5} awful film" for index in range(2500)]
    sa.fit_baseline(texts, np.arange(2500) % 2, sa.BaselineRecipe())
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  baseline features: 2000/2500 texts done, ") for line in lines), lines


def test_the_intervals_bootstrap_shows_its_draws_in_a_log(capsys, monkeypatch):
    # 400,000 test rows took a minute of bootstrap draws without a line (docs/RESULTS.md): now it counts them.
    monkeypatch.setattr(sa.StageProgress, "LOG_EVERY", 0.0)  # a line at every check, not every minute
    monkeypatch.setattr(sa, "BOOTSTRAP_CELLS", 100_000)  # blocks of 100 draws of the 1,000 rows
    labels = np.arange(1000) % 2
    probabilities = {"model": np.stack([1 - labels * 0.8, labels * 0.8 + 0.1], axis=1)}
    drawn = sa.bootstrap_figures(labels, probabilities, ("negative", "positive"))
    lines = [line.split(",")[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == [f"  intervals: {done}/1000 draws" for done in range(100, 1000, 100)]
    assert drawn["model"]["accuracy"].shape == (1000,)


def test_the_learning_curves_intervals_are_one_pass_of_draws_with_progress(capsys, monkeypatch):
    # The learning curve's five points on 200,000 validation rows drew the bootstrap five times in silence (17 s
    # of a 62 s gap in a log: docs/RESULTS.md); now one pass of draws, counted, with the same intervals.
    generator = np.random.default_rng(5)
    labels = generator.integers(0, 2, 1000)
    guesses = generator.random(1000), np.clip(labels * 0.6 + generator.random(1000) * 0.5, 0, 1)
    points = [(share, 10, np.stack([1 - p, p], axis=1)) for share, p in zip((0.25, 1.0), guesses)]
    alone = [sa.mean_interval(sa.predicted_labels(p) == labels) for _, _, p in points]
    capsys.readouterr()
    monkeypatch.setattr(sa.StageProgress, "LOG_EVERY", 0.0)
    monkeypatch.setattr(sa, "BOOTSTRAP_CELLS", 100_000)  # blocks of 100 draws of the 1,000 rows
    curve = sa.curve_points(points, labels)
    assert [point["interval"] for point in curve] == alone
    assert alone[0] != alone[1] and [point["share"] for point in curve] == [0.25, 1.0]
    lines = [line.split(",")[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == [f"  intervals of the learning curve: {done}/1000 draws" for done in range(100, 1000, 100)]
