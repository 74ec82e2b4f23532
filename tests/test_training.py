"""End-to-end training on the tiny CSV: every output file, its shape and its value ranges."""

import json

import pandas as pd
import pytest

from conftest import TINY_CSV, TINY_FLAGS, run_main, split, train_tiny, train_tiny_in_process

EXPECTED_FILES = ["model.keras", "metrics.json", "classification_report.txt", "history.csv", "errors.csv",
                  "confusion_matrix.png", "roc_curve.png", "training_history.png", "report.html",
                  "saved_model/1/saved_model.pb", "saved_model/1/fingerprint.pb"]
METRIC_NAMES = ["accuracy", "precision", "recall", "f1", "roc_auc"]


def check_scores(scores):
    for name in METRIC_NAMES:
        assert 0.0 <= scores[name] <= 1.0, (name, scores[name])
    matrix = scores["confusion_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    return sum(map(sum, matrix))


@pytest.mark.slow
def test_every_output_is_written(trained_dir):
    for name in EXPECTED_FILES:
        path = trained_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("confusion_matrix.png", "roc_curve.png", "training_history.png"):
        assert (trained_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [path.name for path in trained_dir.iterdir() if path.name.startswith(".")]
    assert leftovers == [], "temporary files were left behind"
    assert not (trained_dir / "training_state").exists(), "the resume state is removed after a finished run"


@pytest.mark.slow
def test_metrics_json_is_complete(trained_dir):
    metrics = json.loads((trained_dir / "metrics.json").read_text())
    rows = pd.read_csv(TINY_CSV)
    assert metrics["model"] == "lstm"
    # The binary IMDB run keeps its names: the positive class's figures, plus every class's own.
    assert metrics["classes"] == ["negative", "positive"]
    assert list(metrics["test"]) == ["accuracy", "precision", "recall", "f1", "roc_auc", "confusion_matrix",
                                     "threshold", "per_class", "accuracy_interval", "f1_interval", "roc_auc_interval"]
    assert set(metrics["test"]["per_class"]) == {"negative", "positive"}
    assert metrics["test"]["per_class"]["positive"]["recall"] == metrics["test"]["recall"]
    assert metrics["data"]["positive"] + metrics["data"]["negative"] == metrics["data"]["rows_used"]
    assert metrics["data"]["classes"] == {"negative": metrics["data"]["negative"],
                                          "positive": metrics["data"]["positive"]}
    test_rows = check_scores(metrics["test"])
    check_scores(metrics["baseline"])
    data = metrics["data"]
    assert data["rows_read"] == len(rows)
    assert set(data["dropped"]) == {"missing_text", "duplicate_text"}
    assert data["unlabelled"] == {"from_data": 0, "from_file": 0, "read": 0, "duplicates": 0,
                                  "equal_to_validation_or_test": 0, "kept": 0, "used": 0}
    assert metrics["semi_supervised"] == {"method": "none", "chosen": "auto: no unlabelled text"}
    assert data["train"] + data["validation"] + data["test"] == data["rows_used"]
    assert data["test"] == test_rows == round(0.2 * data["rows_used"])
    assert metrics["config"]["epochs"] == 1 and metrics["config"]["seed"] == 42
    timing = metrics["timing"]
    stages = {name: seconds for name, seconds in timing.items() if name not in ("total_s", "epoch_s")}
    assert {"load_s", "preprocess_s", "train_s", "baseline_s", "validation_s", "evaluate_s", "write_s",
            "report_s"} <= set(stages)
    # The stages are parts of the whole run, one after another; the epochs are parts of the training.
    assert 0 < sum(stages.values()) <= timing["total_s"] + 0.01 * len(stages)
    assert len(timing["epoch_s"]) == metrics["training"]["epochs_run"] == 1
    assert 0 < sum(timing["epoch_s"]) <= timing["train_s"] + 0.01
    # The page shows the stages up to its own writing; metrics.json, written last, also the report's time.
    assert list(metrics)[-1] == "timing"
    page = (trained_dir / "report.html").read_text()
    assert "<h2>Time</h2>" in page and "report_s" not in page and "write_s" in page


@pytest.mark.slow
def test_history_report_and_errors(trained_dir):
    history = pd.read_csv(trained_dir / "history.csv")
    assert list(history["epoch"]) == [1]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    report = (trained_dir / "classification_report.txt").read_text()
    assert "negative" in report and "positive" in report and "accuracy" in report
    errors = pd.read_csv(trained_dir / "errors.csv")
    assert list(errors.columns) == ["text", "true_label", "predicted_label", "probability_positive"]
    metrics = json.loads((trained_dir / "metrics.json").read_text())
    matrix = metrics["test"]["confusion_matrix"]
    assert len(errors) == min(100, matrix[0][1] + matrix[1][0])
    assert (errors["true_label"] != errors["predicted_label"]).all()
    confidence = (errors["probability_positive"] - 0.5).abs()
    assert (confidence.diff().dropna() <= 1e-4).all()  # most confident first, to the file's 4 decimals
    training = metrics["training"]  # the throughput: real tokens of an epoch over the epochs' seconds
    assert training["tokens_per_epoch"] > 0 and training["tokens_per_second"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("flags, recurrent", [
    (["--arch", "bilstm"], ["Bidirectional(LSTM(100))"]),
    (["--arch", "gru", "--layers", "2", "--units", "16"], ["GRU(16)", "GRU(16)"]),
    (["--embeddings", "random", "--lr-schedule", "constant", "--weight-decay", "0.01"], ["LSTM(100)"]),
])
def test_architecture_and_embedding_options_train(tmp_path, flags, recurrent):
    """Each option trains, and the saved model holds the recurrent layers the flags name."""
    import sentiment_analysis as sa

    result = train_tiny_in_process(tmp_path, "--no-baseline", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    check_scores(metrics["test"])
    assert "baseline" not in metrics
    assert metrics["model"] == metrics["config"]["arch"]
    classifier = next(layer for layer in sa.load_model(tmp_path / "model.keras").layers
                      if layer.name.endswith("_classifier"))
    assert recurrent_layers(classifier) == recurrent


def recurrent_layers(classifier) -> list[str]:
    """The recurrent layers of a classifier as TYPE(UNITS), a Bidirectional one as Bidirectional(TYPE(UNITS))."""
    described = []
    for layer in classifier.layers:
        inner = getattr(layer, "forward_layer", layer)
        if hasattr(inner, "units") and type(inner).__name__ in ("LSTM", "GRU"):
            text = f"{type(inner).__name__}({inner.units})"
            described.append(f"Bidirectional({text})" if inner is not layer else text)
    return described


@pytest.mark.slow
def test_best_preset_reports_each_part_and_the_blend(tmp_path):
    result = train_tiny_in_process(tmp_path, "--preset", "best")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "blend" and metrics["config"]["blend_weight"] == "auto"
    assert 0.0 <= metrics["blend_weight"] <= 1.0
    for part in ("test", "lstm", "baseline"):
        check_scores(metrics[part])
    assert "blend" in result.stdout and "baseline" in result.stdout


@pytest.mark.slow
def test_same_seed_gives_the_same_run(trained_dir, tmp_path):
    """A second process with the flags of the shared run gives the same figures and history."""
    result = train_tiny(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads((path / "metrics.json").read_text()) for path in (trained_dir, tmp_path)]
    for part in ("test", "baseline"):
        assert metrics[0][part] == metrics[1][part]
    history = [pd.read_csv(path / "history.csv") for path in (trained_dir, tmp_path)]
    pd.testing.assert_frame_equal(history[0], history[1])


@pytest.mark.slow
def test_a_directory_of_shards_trains_the_same_run_as_the_whole_file_and_predicts(trained_dir, tmp_path):
    """The tiny CSV cut into three files (one a TSV) in a directory: the run reads them as the one file, so it
    trains the same model (history and figures equal to the shared run's), and the model predicts."""
    rows, shards = pd.read_csv(TINY_CSV), tmp_path / "shards"
    shards.mkdir()
    for index, start in enumerate(range(0, len(rows), -(-len(rows) // 3))):
        tsv = index == 1
        rows.iloc[start:start + -(-len(rows) // 3)].to_csv(shards / f"part-{index}.{'tsv' if tsv else 'csv'}",
                                                           index=False, sep="\t" if tsv else ",")
    result = train_tiny(tmp_path / "out", data=shards)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from {shards}" in result.stdout
    metrics = [json.loads((path / "metrics.json").read_text()) for path in (trained_dir, tmp_path / "out")]
    assert metrics[0]["test"] == metrics[1]["test"] and metrics[0]["data"] == metrics[1]["data"]
    history = [pd.read_csv(path / "history.csv") for path in (trained_dir, tmp_path / "out")]
    pd.testing.assert_frame_equal(history[0], history[1])
    predicted = run_main("predict", "--model", tmp_path / "out" / "model.keras", "a wonderful, moving film")
    assert predicted.returncode == 0 and predicted.stdout.split()[0] in ("positive", "negative"), predicted


@pytest.mark.slow
def test_exported_blend_scores_exactly_like_scikit_learn(tmp_path):
    """The baseline inside the saved model gives scikit-learn's probabilities, for uni-, bi- and trigrams."""
    import numpy as np

    import sentiment_analysis as sa

    rows = pd.read_csv(TINY_CSV)
    texts, labels = rows["reviews"].to_numpy(object), (rows["sentiment"] == "positive").to_numpy(int)
    config = sa.TrainConfig(vocab_size=500, max_length=50, baseline_ngrams=3)
    baseline = sa.fit_baseline(sa.standardized_strings(texts[:150], sa.standardize_text), labels[:150],
                               sa.BaselineRecipe.of(config))
    expected = baseline.predict_proba(sa.standardized_strings(texts[150:], sa.standardize_text))
    vectorizer = sa.learned_vectorizer(texts[:150], sa.ModelRecipe.of(config), config.max_length)
    neural = sa.build_predictor(vectorizer, sa.build_classifier(config, len(vectorizer.get_vocabulary())),
                             sa.CLASS_NAMES)
    sa._save_model(sa.build_blend_predictor(neural, baseline, 0.0, sa.CLASS_NAMES), tmp_path / "blend.keras")
    loaded = sa.load_model(tmp_path / "blend.keras")
    np.testing.assert_allclose(sa.predict_strings(loaded, list(texts[150:])), expected, atol=1e-5)
    assert sa.model_class_names(loaded) == sa.CLASS_NAMES
    half = sa.build_blend_predictor(neural, baseline, 0.5, sa.CLASS_NAMES)
    neural_part = sa.predict_strings(neural, list(texts[150:]))
    np.testing.assert_allclose(sa.predict_strings(half, list(texts[150:])), 0.5 * neural_part + 0.5 * expected,
                               atol=1e-5)


@pytest.mark.slow
def test_a_fixed_blend_weight_gets_advice_about_the_blend(tmp_path):
    """--blend-weight 0.9 saves the blend: the validation advice compares that blend with the baseline, by the
    blend's own validation accuracy, and never the lstm alone."""
    import sentiment_analysis as sa

    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, *TINY_FLAGS, "--blend-weight", "0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "blend"
    advice = [note for note in metrics["notes"] if "the baseline" in note and "validation split" in note]
    assert advice and all("blend" in note and "lstm" not in note for note in advice), metrics["notes"]
    config = sa.TrainConfig(data=str(TINY_CSV))
    validation = split(sa.load_dataset(config), config).validation
    blended = sa.predict_strings(sa.load_model(tmp_path / "model.keras"), list(validation.texts))
    assert f"{sa.accuracy_of(validation.labels, blended):.4f}" in advice[0]
    assert f"Note: {advice[0]}" in result.stdout


def test_blend_weight_is_chosen_on_validation_data():
    import numpy as np

    import sentiment_analysis as sa

    labels = np.array([0, 1] * 50)
    good, noise = sa.class_probabilities(labels * 0.8 + 0.1), sa.class_probabilities(np.full(100, 0.5))
    assert sa.choose_blend_weight(labels, good, noise) == 1.0
    assert sa.choose_blend_weight(labels, noise, good) == 0.0


@pytest.mark.slow
def test_mixed_precision_training_step_runs_with_loss_scaling():
    """The --mixed-precision path of the custom loop (normally on a GPU), exercised on the CPU: the optimizer
    scales the loss, the output layer stays float32, and one step changes the weights by a finite amount."""
    import keras
    import numpy as np
    import tensorflow as tf

    import sentiment_analysis as sa

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        config = sa.TrainConfig(vocab_size=50, max_length=10, embedding_dim=8, units=4)
        strategy = tf.distribute.get_strategy()
        classifier = sa.build_classifier(config, 50)
        optimizer = sa.build_optimizer(sa.OptimizerRecipe.of(config), sa.TrainingPlan(32, 2, 4, 1, 5, "test"))
        optimizer.build(classifier.trainable_variables)
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert classifier.get_layer("probability").dtype_policy.compute_dtype == "float32"
        train_step = sa.build_step_functions(classifier, optimizer, strategy).train
        token_ids = np.random.default_rng(0).integers(1, 50, (8, 10)).astype(np.int32)
        labels = (np.arange(8) % 2).astype(np.float32)
        batches = tf.data.Dataset.from_tensor_slices((token_ids, labels, np.ones(8, np.float32))).batch(4)
        before = classifier.get_weights()
        loss_sum, correct, count = (float(value) for value in train_step(iter(batches)))
        assert count == 4 and 0 <= correct <= 4 and np.isfinite(loss_sum) and loss_sum > 0
        change = sum(np.abs(new - old).sum() for new, old in zip(classifier.get_weights(), before))
        assert np.isfinite(change) and change > 0
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_every_arch_choice_has_a_builder_and_a_model_without_the_named_layers_is_refused(monkeypatch):
    import sentiment_analysis as sa

    choices = sa.build_train_parser()._option_string_actions["--arch"].choices
    assert set(choices) == set(sa.ARCHITECTURES)

    def unnamed(config, vocab_size, num_classes, embedding_dim):  # a new model that forgot the layer names
        inputs = sa.keras.Input(shape=(None,), dtype="int32")
        x = sa.layers.GlobalAveragePooling1D()(sa.layers.Embedding(vocab_size, embedding_dim)(inputs))
        return sa.keras.Model(inputs, sa.layers.Dense(1, activation="sigmoid")(x), name="mean_classifier")

    monkeypatch.setitem(sa.ARCHITECTURES, "lstm", sa.Architecture(unnamed))
    with pytest.raises(ValueError, match="needs a layer 'probability', a token embedding 'embedding'"):
        sa.build_classifier(sa.TrainConfig(embedding_dim=4), 20)


def test_each_architecture_explains_itself_and_a_branched_one_brings_its_own_split(monkeypatch, capsys):
    """Explanations come from each architecture's own split (the embedding, then a function of the embedded
    tokens): for the card's models it replays the chain and gives the classifier's own output. A branched model
    (two Conv1D layers joined) without an explain function is said so in one line before training and
    --explain on it is a one-line error; with its own function its words are scored."""
    from types import SimpleNamespace

    import numpy as np

    import sentiment_analysis as sa

    ids = np.array([[2, 3, 4, 5, 6]], dtype=np.int32)  # no padding
    for flags in ([], ["--arch", "gru"], ["--arch", "bilstm"], ["--layers", "2"]):
        config = sa.config_from_args(sa.build_train_parser().parse_args(flags))
        classifier = sa.build_classifier(config, 30)
        embedding, rest = sa.ARCHITECTURES[config.arch].explain(classifier)
        np.testing.assert_allclose(rest(embedding(ids)), classifier(ids, training=False), rtol=1e-5, atol=1e-6)

    def branched(config, vocab_size, num_classes, embedding_dim):
        token_ids = sa.keras.Input(shape=(None,), dtype="int32")
        short, long, pool = (sa.layers.Conv1D(4, 3, padding="same"), sa.layers.Conv1D(4, 5, padding="same"),
                             sa.layers.GlobalMaxPooling1D())
        output = sa.output_layer(num_classes)
        heads.append(lambda vectors: output(pool(sa.layers.Concatenate()([short(vectors), long(vectors)]))))
        vectors = sa.layers.Embedding(vocab_size, embedding_dim, name=sa.EMBEDDING_LAYER)(token_ids)
        return sa.keras.Model(token_ids, heads[-1](vectors), name="cnn" + sa.CLASSIFIER_SUFFIX)

    heads = []
    vectorizer = sa.word_vectorizer(10, 8)
    vectorizer.set_vocabulary(["good", "bad", "film"])
    inputs = SimpleNamespace(vocabulary=vectorizer.get_vocabulary(), embedding_matrix=None,
                             plan=sa.TrainingPlan(4, 1, 1, 1, 0, "test"))
    strategy = sa.tf.distribute.get_strategy()
    monkeypatch.setitem(sa.ARCHITECTURES, "lstm", sa.Architecture(branched))
    classifier, _ = sa.build_model_and_optimizer(sa.TrainConfig(), inputs, 2, strategy, 8)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
    assert len(notes) == 1 and "cannot be explained word by word" in notes[0]
    model = sa.build_predictor(vectorizer, classifier, ("negative", "positive"), {"arch": "lstm"})
    with pytest.raises(sa.UserError, match="no explain function"):
        sa.build_explainer(model, ("negative", "positive"))

    own = sa.Architecture(branched, explain=lambda built: (built.get_layer(sa.EMBEDDING_LAYER), heads[-1]))
    monkeypatch.setitem(sa.ARCHITECTURES, "lstm", own)
    classifier, _ = sa.build_model_and_optimizer(sa.TrainConfig(), inputs, 2, strategy, 8)
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
    model = sa.build_predictor(vectorizer, classifier, ("negative", "positive"), {"arch": "lstm"})
    explanation = sa.explain_text(sa.build_explainer(model, ("negative", "positive")), "good film", 1)
    assert explanation.words == ["good", "film"] and np.abs(explanation.scores).sum() > 0
