"""--semi-supervised lm and both: the embedding and the recurrent layer pretrained as a next-word language model
on the training split and the unlabelled texts, through the training loop, before the labels."""

import json
import math
import signal

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import TINY_CSV, TINY_FLAGS, assert_user_error, build_once, run_main
from test_resilience import run_two_workers, start_training, wait_for_first_epoch
from test_semi_supervised import config_for, write_semi_csv

import sentiment_analysis as sa

# The language-model stage on the tiny CSV's 120 labelled rows' training split and its 80 unlabelled texts:
# 3 epochs of batches of 8, then one epoch on the labels.
LM_FLAGS = [*TINY_FLAGS, "--semi-supervised", "lm", "--pretrain-epochs", "3", "--batch-size", "8"]


@pytest.mark.parametrize("flags, fragment", [
    (["--semi-supervised", "lm", "--arch", "bert"], "use --arch lstm or gru (--arch bert cannot: BERT brings"),
    (["--semi-supervised", "lm", "--arch", "bilstm"], "its backward layer sees the next word"),
    (["--semi-supervised", "both", "--no-baseline"], "both needs the baseline"),
])
def test_language_model_flags_that_cannot_work_are_one_line(tmp_path, flags, fragment):
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path / "out", *TINY_FLAGS, *flags)
    assert_user_error(result, fragment)
    assert "Epoch" not in result.stdout and not (tmp_path / "out" / "metrics.json").exists()


def test_both_without_unlabelled_text_models_the_language_then_distils():
    semi = sa.choose_semi_supervised(sa.TrainConfig(semi_supervised="both"), 1000, 0, True)
    assert semi.models_language and semi.teaches and semi.distils


def test_lm_needs_no_unlabelled_text_the_training_split_is_text():
    config = sa.TrainConfig(semi_supervised="lm")
    assert sa.choose_semi_supervised(config, 1000, 0, True) == sa.SemiSupervised("lm", "as given")


def test_held_out_text_is_the_first_validation_texts_up_to_the_token_limit():
    ids = np.zeros((5, 10), dtype=np.int32)
    for row, length in enumerate([4, 3, 5, 2, 6]):
        ids[row, :length] = 7
    assert len(sa.held_out_ids(ids, limit=7)) == 2    # 4 + 3 tokens
    assert len(sa.held_out_ids(ids, limit=11)) == 2   # a third text would pass the limit
    assert len(sa.held_out_ids(ids, limit=2)) == 1    # at least one text
    assert len(sa.held_out_ids(ids, limit=100)) == 5


def test_sampled_words_follow_the_seed_and_zipf():
    true_words = tf.constant([[3], [900]], dtype=tf.int64)
    first = sa.sample_words(true_words, 1000, 4096, tf.constant([42, 7], tf.int64))
    again = sa.sample_words(true_words, 1000, 4096, tf.constant([42, 7], tf.int64))
    other = sa.sample_words(true_words, 1000, 4096, tf.constant([42, 8], tf.int64))
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())  # a resumed step draws the same words
    assert not np.array_equal(first[0].numpy(), other[0].numpy())
    sampled = first[0].numpy()
    assert sampled.min() >= 0 and sampled.max() < 1000
    assert (sampled < 10).mean() > (sampled >= 500).mean()  # frequent (low) ids drawn far more often
    # The expected count of every word, over the whole vocabulary, adds up to the words drawn.
    everything = sa.sample_words(tf.range(1000, dtype=tf.int64)[:, None], 1000, 4096, tf.constant([1, 1], tf.int64))
    assert float(tf.reduce_sum(everything[1])) == pytest.approx(4096, rel=1e-4)
    assert first[1].shape == (2, 1) and first[2].shape == (4096,)
    assert float(first[1][0, 0]) > float(first[1][1, 0])


def test_language_model_steps_count_real_next_words_and_score_them_exactly():
    sa.keras.utils.set_random_seed(0)
    config = sa.TrainConfig(embedding_dim=8, units=6, spatial_dropout=0.0)
    strategy = tf.distribute.get_strategy()
    model = sa.LanguageModel(config, 40, 8)
    model(np.ones((1, 2), dtype=np.int32))
    optimizer = sa.build_optimizer(config, sa.TrainingPlan(4, 1, 1, 1, 0, "test"))
    optimizer.build(model.trainable_variables)
    steps = sa.language_model_steps(model, optimizer, strategy, seed=42)
    assert steps.names == ("loss", "val_loss", "val_accuracy")
    token_ids = np.array([[5, 9, 2, 0, 0], [7, 3, 3, 8, 1], [4, 4, 0, 0, 0]], dtype=np.int32)
    weights = np.array([1.0, 1.0, 0.0], dtype=np.float32)  # the third a weight-0 copy: not counted
    batch = (token_ids, np.zeros(3, np.float32), weights)
    loss_sum, correct, count = (float(value) for value in steps.validation(iter(tf.data.Dataset.from_tensors(batch))))
    assert count == 2 + 4  # next words after each real token but the last, of the weighted texts
    states = model(token_ids[:2, :-1]).numpy()
    logits = states @ model.next_word_kernel.numpy().T + model.next_word_bias.numpy()
    targets = token_ids[:2, 1:]
    log_probabilities = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    real = targets != 0
    expected = -np.take_along_axis(log_probabilities, targets[..., None], axis=-1)[..., 0][real].sum()
    assert loss_sum == pytest.approx(expected, rel=1e-4)
    assert correct == (logits.argmax(axis=-1) == targets)[real].sum()
    before = [weight.copy() for weight in model.get_weights()]
    train_sum, _, train_count = (float(value) for value in steps.train(iter(tf.data.Dataset.from_tensors(batch))))
    assert train_count == 6 and train_sum > 0
    assert any(not np.array_equal(b, a) for b, a in zip(before, model.get_weights()))


@pytest.mark.slow
def test_the_classifier_starts_from_the_language_models_weights(tmp_path):
    sa.keras.utils.set_random_seed(42)
    data = write_semi_csv(tmp_path / "few_labels.csv")
    config = config_for(data, batch_size=16, pretrain_epochs=1, embeddings="random", semi_supervised="lm",
                        embedding_dim=16)
    loaded = sa.load_dataset(config)
    splits = sa.split_dataset(loaded, config)
    unlabelled = sa.gather_unlabelled(loaded, splits, config.unlabelled, config.text_column)
    derived = sa.Derived.of(config)
    fingerprint = sa.training_fingerprint(config, derived)
    inputs = sa.prepare_inputs(splits, config, derived, 1, 2, unlabelled.texts)
    strategy = tf.distribute.get_strategy()
    classifier, _ = sa.build_model_and_optimizer(config, inputs, 2, strategy, derived.embedding_dim)
    fresh = {layer.name: [weight.copy() for weight in layer.get_weights()] for layer in classifier.layers}
    stage = sa.learn_language_model(classifier, strategy, inputs, config, fingerprint, tmp_path / "state", False,
                                    None)
    assert stage.result.epochs_run == 1 and stage.texts == len(splits.train.texts) + 80
    assert stage.result.plan.steps_per_epoch >= stage.texts // 16
    assert set(stage.result.history) == {"loss", "val_loss", "val_accuracy"}
    shared = sa.classifier_shared_layers(classifier)
    assert [type(layer).__name__ for layer in shared] == ["Embedding", "LSTM"]
    for layer in shared:  # the pretrained weights, not the fresh ones
        assert any(not np.array_equal(before, after) for before, after in zip(fresh[layer.name], layer.get_weights()))
    # The classifier holds exactly the language model's kept weights (rebuilt from the saved best epoch).
    saved = sa.TrainingState.load(tmp_path / "state", fingerprint)
    model = sa.LanguageModel(config, len(inputs.vocabulary), 16)
    model(np.ones((1, 2), dtype=np.int32))
    model.set_weights(saved.best_weights)
    for from_layer, to_layer in zip(model.shared_layers(), shared, strict=True):
        for weight, kept in zip(from_layer.get_weights(), to_layer.get_weights(), strict=True):
            np.testing.assert_array_equal(weight, kept)
    output = classifier.get_layer(sa.OUTPUT_LAYER).get_weights()  # the output layer stays new
    for weight, new in zip(fresh[sa.OUTPUT_LAYER], output):
        np.testing.assert_array_equal(weight, new)
    # The labelled stage starts fresh: no epoch 0 to keep, the language model is no classifier.
    start = sa.fine_tuning_start(fingerprint, sa.Pretraining("lm", "as given", 80, 0, language_model=stage))
    assert start.best_epoch is None and start.best_weights is None


def lm_run(output_dir, data, *flags):
    result = run_main("--data", data, "--output-dir", output_dir, *LM_FLAGS, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """One uninterrupted tiny run with a language-model stage, shared by the tests that read it."""
    data = write_semi_csv(tmp_path_factory.getbasetemp() / "lm_few_labels.csv")
    return build_once(tmp_path_factory, "lm", lambda output_dir: lm_run(output_dir, data))


@pytest.mark.slow
def test_lm_run_reports_its_stage_and_saves_a_model_that_predicts(lm_dir):
    output_dir, stdout = lm_dir
    assert "Unlabelled text: lm (as given)" in stdout and "Language-model stage: 3 epochs of " in stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    semi = metrics["semi_supervised"]
    stage = semi["language_model"]
    assert semi["method"] == "lm" and "teacher" not in semi
    assert stage["texts"] == metrics["data"]["train"] + 80 and stage["tokens"] > stage["texts"]
    assert stage["held_out_tokens"] > 0 and stage["sampled_words"] == sa.LM_SAMPLED_WORDS
    assert stage["epochs_run"] == len(stage["history"]["loss"]) == len(stage["held_out_perplexity"]) >= 1
    for loss, perplexity in zip(stage["history"]["val_loss"], stage["held_out_perplexity"]):
        assert perplexity == pytest.approx(math.exp(loss), abs=0.01)
    assert stage["best_perplexity"] in stage["held_out_perplexity"] and stage["seconds"] > 0
    assert stage["tokens_per_second"] > 0 and stage["classifier_tokens_per_second"] > 0
    assert semi["fine_tuning_learning_rate"] == metrics["config"]["learning_rate"] * 0.25
    assert metrics["started_from"]["pretrained"].startswith(f"a next-word language model on {stage['texts']} texts")
    assert metrics["timing"]["language_model_s"] > 0 and "pretrain_s" not in metrics["timing"]
    assert metrics["training"]["epochs_run"] == 1
    assert (output_dir / "pretraining_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (output_dir / "report.html").read_text()
    assert "Unlabelled text: the language-model stage" in page and "pretraining_history.png" in page
    assert (output_dir / "tensorboard" / "language_model" / "validation").is_dir()
    assert not (output_dir / "training_state").exists()
    result = run_main("predict", "--model", output_dir / "model.keras", "A wonderful, moving film.")
    assert result.returncode == 0 and result.stdout.split()[0] in ("positive", "negative")


@pytest.mark.slow
def test_a_run_killed_in_the_language_model_stage_resumes_there(lm_dir, tmp_path):
    output_dir = tmp_path / "killed"
    data = write_semi_csv(tmp_path / "few_labels.csv")
    process = start_training(output_dir, LM_FLAGS, data=data)
    wait_for_first_epoch(process, output_dir, stage="language_model")
    process.send_signal(signal.SIGKILL)
    process.wait()
    state_file = output_dir / "training_state" / "language_model" / "state.json"
    saved = json.loads(state_file.read_text())
    assert 1 <= saved["epoch"] < 3 and not (output_dir / "metrics.json").exists()

    result = run_main("--data", data, "--output-dir", output_dir, *LM_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming after epoch {saved['epoch']}" in result.stdout
    stage = json.loads((output_dir / "metrics.json").read_text())["semi_supervised"]["language_model"]
    assert stage["resumed_after_epoch"] == saved["epoch"]
    # The same words drawn and the same weights as the run that was never stopped: the same curves and figures.
    whole = json.loads((lm_dir[0] / "metrics.json").read_text())
    assert stage["history"] == whole["semi_supervised"]["language_model"]["history"]
    pd.testing.assert_frame_equal(pd.read_csv(output_dir / "history.csv"), pd.read_csv(lm_dir[0] / "history.csv"))
    assert json.loads((output_dir / "metrics.json").read_text())["test"] == whole["test"]


@pytest.mark.slow
def test_both_stages_on_two_replicas_count_every_text(tmp_path):
    data = write_semi_csv(tmp_path / "few_labels.csv")
    result = run_main("--data", data, "--output-dir", tmp_path / "out", *TINY_FLAGS, "--semi-supervised", "both",
                      "--pretrain-epochs", "1", "--batch-size", "8", "--cpu-replicas", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.index("Language-model stage") < result.stdout.index("Teacher stage")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "MirroredStrategy" in metrics["environment"]["strategy"]
    semi = metrics["semi_supervised"]
    assert semi["method"] == "both" and semi["texts"] == 80 and semi["epochs_run"] == 1
    assert semi["language_model"]["texts"] == metrics["data"]["train"] + 80
    assert semi["language_model"]["epochs_run"] == 1
    assert ", then taught by the TF-IDF baseline's" in metrics["started_from"]["pretrained"]


@pytest.mark.slow
def test_two_workers_run_the_language_model_stage_together(tmp_path):
    data = write_semi_csv(tmp_path / "few_labels.csv")
    results = run_two_workers([tmp_path / "worker-0", tmp_path / "worker-1"],
                              [*LM_FLAGS, "--pretrain-epochs", "1"], data=data)
    outputs = [(stdout, stderr) for _, stdout, stderr in results]
    for returncode, stdout, stderr in results:
        assert returncode == 0, stderr[-3000:]
        assert "Language-model stage: 1 epochs" in stdout
    # Both workers ran the same steps of both stages on the same batches, split between them.
    epoch_lines = [[line.split(" - loss")[1] for line in stdout.splitlines() if "val_loss" in line]
                   for stdout, _ in outputs]
    assert len(epoch_lines[0]) == 2 and epoch_lines[0] == epoch_lines[1]
    metrics = json.loads((tmp_path / "worker-0" / "metrics.json").read_text())
    assert metrics["semi_supervised"]["language_model"]["epochs_run"] == 1
    assert metrics["environment"]["replicas"] == 2
    assert list((tmp_path / "worker-1").iterdir()) == []
