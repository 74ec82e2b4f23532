"""Any labelled text: own label names, two classes of any spelling, more than two, imbalance, other separators."""

import json

import numpy as np
import pandas as pd
import pytest

import sentiment_analysis as sa
from conftest import TINY_FLAGS, assert_user_error, build_once, run_main

WORDS = {"negative": "awful terrible delayed rude lost refund worst".split(),
         "neutral": "flight gate today schedule seat boarding question".split(),
         "positive": "great thanks lovely friendly smooth best kind".split(),
         "spam": "win prize free claim cash now urgent".split(),
         "ham": "see you later dinner home ok call".split()}
COMMON = "the a my to on with and was is for".split()


def labelled_texts(labels, seed=0):
    """One text per label, made of that label's words and common ones (and a number, so none repeats)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[label] + COMMON, rng.integers(5, 25))) + f" {i}"
            for i, label in enumerate(labels)]


def write_airline_csv(path):
    """Made-up tweets in three classes, 60 of each, labelled in the column airline_sentiment."""
    labels = ["negative", "neutral", "positive"] * 60
    pd.DataFrame({"text": labelled_texts(labels), "airline_sentiment": labels}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def airline_csv(tmp_path_factory):
    return write_airline_csv(tmp_path_factory.mktemp("airline") / "tweets.csv")


@pytest.fixture(scope="session")
def three_class_run(tmp_path_factory):
    def build(output_dir):
        data = write_airline_csv(output_dir.parent / "three_class_tweets.csv")
        result = run_main("--data", data, "--label-column", "airline_sentiment", "--output-dir", output_dir,
                          *TINY_FLAGS, "--blend-weight", "auto")
        assert result.returncode == 0, result.stderr[-3000:]
        return output_dir, result

    return build_once(tmp_path_factory, "three", build)


def sms_frame(spam_every=5, rows=200):
    labels = ["spam" if i % spam_every == 0 else "ham" for i in range(rows)]
    return pd.DataFrame({"text": labelled_texts(labels, seed=1), "label": labels})


# --- Labels, in process -------------------------------------------------------------------------------------


def test_two_other_names_make_the_less_frequent_class_positive():
    encoded, classes = sa.encode_labels(pd.Series(["ham", " spam", "ham", "ham "]))
    assert classes.names == ("ham", "spam") and classes.chosen_by == "the less frequent class"
    assert encoded.tolist() == [0, 1, 0, 0]
    encoded, classes = sa.encode_labels(pd.Series(["ham", "spam", "ham", "ham"]), positive_label=" ham")
    assert classes.names == ("spam", "ham") and classes.chosen_by == "--positive-label"
    assert encoded.tolist() == [1, 0, 1, 1]


def test_label_case_is_kept_and_known_spellings_keep_their_meaning():
    _, classes = sa.encode_labels(pd.Series(["Good", "Bad", "Bad"]))
    assert classes.names == ("Bad", "Good")
    encoded, classes = sa.encode_labels(pd.Series(["POS", "neg", "neg"]), positive_label="neg")
    assert classes.names == ("positive", "negative") and encoded.tolist() == [0, 1, 1]


def test_star_ratings_are_ordered_as_numbers():
    encoded, classes = sa.encode_labels(pd.Series(["10", "2", "1", "9", "10"]))
    assert classes.names == ("1", "2", "9", "10") and not classes.binary
    assert encoded.tolist() == [3, 1, 0, 2, 3]


@pytest.mark.parametrize("labels, positive, fragment", [
    (["a", "b", "c"], "a", "needs two classes"),
    (["ham", "spam"], "eggs", "'eggs' is not one of the labels"),
])
def test_positive_label_mistakes(labels, positive, fragment):
    with pytest.raises(sa.UserError, match=fragment):
        sa.encode_labels(pd.Series(labels), positive_label=positive)


def test_tab_separated_files_read_like_csv(tmp_path):
    frame = sms_frame()
    frame.to_csv(tmp_path / "sms.tsv", sep="\t", index=False)
    frame.to_csv(tmp_path / "sms.txt", sep=";", index=False)
    for name, sep in (("sms.tsv", None), ("sms.txt", ";")):
        loaded = sa.load_dataset(sa.TrainConfig(data=str(tmp_path / name), sep=sep))
        assert loaded.texts.tolist() == frame["text"].tolist()
        assert loaded.classes.names == ("ham", "spam")
    assert_user_error(run_main("--data", tmp_path / "sms.txt", "--sep", ";;", "--output-dir", tmp_path / "o"),
                      "--sep")


@pytest.mark.slow
def test_balanced_class_weights_weight_the_training_loss():
    """--class-weight balanced: weights rows / (classes * rows of the class) on the training split, and the
    training step's loss is the weighted mean; validation stays unweighted."""
    import keras
    import tensorflow as tf

    labels = np.array([0] * 6 + [1] * 2)
    texts = np.array(labelled_texts(["ham"] * 6 + ["spam"] * 2), dtype=object)
    splits = sa.DataSplits(*(sa.LabelledTexts(texts, labels) for _ in range(3)))
    config = sa.TrainConfig(vocab_size=100, max_length=30, embedding_dim=4, units=3, embeddings="random",
                            class_weight="balanced", spatial_dropout=0.0)
    lstm = sa.ARCHITECTURES[config.arch]
    inputs = sa.prepare_inputs(splits, config, lstm, sa.Derived.of(config, lstm), replicas=1, num_classes=2)
    np.testing.assert_allclose(inputs.class_weights, [8 / (2 * 6), 8 / (2 * 2)])

    keras.utils.set_random_seed(0)
    classifier = sa.build_classifier(config, len(inputs.vocabulary))
    optimizer = sa.build_optimizer(sa.OptimizerRecipe.of(config), sa.TrainingPlan(32, 1, 4, 1, 5, "test"))
    strategy = tf.distribute.get_strategy()
    batch = next(iter(inputs.training_batches(0).unbatch().batch(8)))
    per_review = keras.losses.binary_crossentropy(batch[1][:, None], classifier(batch[0])).numpy()
    class_weights = np.array([1.0, 3.0], dtype=np.float32)  # far from 1, so weighting shows
    steps = sa.build_step_functions(classifier, optimizer, strategy, class_weights)
    train_step, validation_step = steps.train, steps.validation
    validation_loss, _, count = (float(value) for value in validation_step(iter(tf.data.Dataset.from_tensors(batch))))
    weighted_loss, _, _ = (float(value) for value in train_step(iter(tf.data.Dataset.from_tensors(batch))))
    weights = class_weights[batch[1].numpy().astype(int)]
    assert count == 8
    assert validation_loss == pytest.approx(per_review.sum(), rel=1e-5)
    assert weighted_loss == pytest.approx((weights * per_review).sum(), rel=1e-5)
    assert weighted_loss == pytest.approx(validation_loss * 12 / 8, rel=1e-2)  # weights 6 * 1 + 2 * 3 = 12


# --- Three classes end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_classes_train_report_and_plot(three_class_run):
    output_dir, result = three_class_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    names = ["negative", "neutral", "positive"]
    assert metrics["classes"] == names and metrics["model"] == "blend"
    for part in ("test", "baseline", "lstm"):
        scores = metrics[part]
        for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "roc_auc"):
            assert 0 <= scores[key] <= 1, (part, key)
        assert list(scores["per_class"]) == names
        assert np.array(scores["confusion_matrix"]).shape == (3, 3)
        assert sum(map(sum, scores["confusion_matrix"])) == metrics["data"]["test"]
        assert sum(c["support"] for c in scores["per_class"].values()) == metrics["data"]["test"]
    assert metrics["data"]["classes"] == {name: 60 for name in names}
    assert "3 classes" in result.stdout and "f1_macro" in result.stdout
    report = (output_dir / "classification_report.txt").read_text()
    assert all(name in report for name in names)
    errors = pd.read_csv(output_dir / "errors.csv")
    assert list(errors.columns) == ["text", "true_label", "predicted_label", "probability_predicted"]
    assert set(errors["true_label"]) | set(errors["predicted_label"]) <= set(names)
    for figure in ("confusion_matrix.png", "roc_curve.png", "training_history.png"):
        assert (output_dir / figure).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_three_class_model_predicts_the_names_in_every_mode(three_class_run, airline_csv, tmp_path):
    model = three_class_run[0] / "model.keras"
    texts = ["awful rude delayed lost", "thanks lovely friendly", "gate schedule today"]
    by_args = run_main("predict", "--model", model, *texts)
    assert by_args.returncode == 0, by_args.stderr[-3000:]
    rows = [line.split("\t") for line in by_args.stdout.splitlines()]
    assert len(rows) == 3 and {row[0] for row in rows} <= {"negative", "neutral", "positive"}
    assert all(1 / 3 <= float(row[1]) <= 1 for row in rows)
    assert run_main("predict", "--model", model, "-", stdin="\n".join(texts)).stdout == by_args.stdout

    scored_path = tmp_path / "scored.csv"
    result = run_main("predict", "--model", model, "--input", airline_csv, "--output", scored_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pd.read_csv(scored_path)
    assert list(scored.columns) == ["text", "airline_sentiment", "predicted_label", "probability_negative",
                                    "probability_neutral", "probability_positive"]
    probabilities = scored[["probability_negative", "probability_neutral", "probability_positive"]]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=2e-4)
    names = np.array(["negative", "neutral", "positive"])
    assert (names[probabilities.to_numpy().argmax(axis=1)] == scored["predicted_label"]).all()
    assert_user_error(run_main("predict", "--model", model, "--threshold", "0.7", "x"), "two-class models")


@pytest.mark.slow
def test_three_class_saved_model_and_explanations_are_about_the_predicted_class(three_class_run):
    import sentiment_analysis as sa
    import tensorflow as tf

    texts = ["awful rude delayed lost", "thanks lovely friendly"]
    model = sa.load_model(three_class_run[0] / "model.keras")
    expected = sa.predict_strings(model, texts)
    served = tf.saved_model.load(str(three_class_run[0] / "saved_model" / "1")).signatures["serving_default"](
        texts=tf.constant(texts))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    names = sa.predicted_names(expected, sa.model_class_names(model), 0.5)
    assert [label.decode() for label in served["label"].numpy()] == names
    explainer = sa.build_explainer(model, sa.model_class_names(model))
    for text, row in zip(texts, expected):
        explanation = sa.explain_text(explainer, text, sa.explained_class(row))
        assert explanation.towards == sa.model_class_names(model)[int(np.argmax(row))]
        assert explanation.words == text.split() and np.isfinite(explanation.scores).all()
    page = (three_class_run[0] / "report.html").read_text()
    assert "<td>f1_macro</td>" in page and "<td>roc_auc</td>" in page
    errors = pd.read_csv(three_class_run[0] / "errors.csv")
    assert page.count('class="mistake"') == min(20, len(errors))


# --- Two classes of other names -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ham_spam_reports_the_chosen_positive_class_and_the_flag_flips_it(tmp_path):
    data = tmp_path / "sms.tsv"
    sms_frame().to_csv(data, sep="\t", index=False)
    result = run_main("--data", data, "--output-dir", tmp_path / "spam", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "positive class 'spam' (the less frequent class)" in result.stdout
    metrics = json.loads((tmp_path / "spam" / "metrics.json").read_text())
    assert metrics["classes"] == ["ham", "spam"]
    assert metrics["test"]["recall"] == metrics["test"]["per_class"]["spam"]["recall"]

    result = run_main("--data", data, "--output-dir", tmp_path / "ham", *TINY_FLAGS, "--positive-label", "ham")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "positive class 'ham' (--positive-label)" in result.stdout
    flipped = json.loads((tmp_path / "ham" / "metrics.json").read_text())
    assert flipped["classes"] == ["spam", "ham"]
    assert flipped["test"]["recall"] == flipped["test"]["per_class"]["ham"]["recall"]

    scored = tmp_path / "scored.csv"
    result = run_main("predict", "--model", tmp_path / "spam" / "model.keras", "--input", data, "--output", scored)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(scored)
    assert list(frame.columns) == ["text", "label", "predicted_sentiment", "probability_positive"]
    assert set(frame["predicted_sentiment"]) <= {"ham", "spam"}
    assert ((frame["probability_positive"] >= 0.5) == (frame["predicted_sentiment"] == "spam")).all()


@pytest.mark.slow
def test_a_small_class_is_pointed_out_and_class_weights_are_recorded(tmp_path):
    data = tmp_path / "sms.csv"
    sms_frame(spam_every=8).to_csv(data, index=False)
    result = run_main("--data", data, "--output-dir", tmp_path, *TINY_FLAGS, "--class-weight", "balanced",
                      "--no-baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the smallest class, 'spam', is 12.5% of the rows" in result.stdout
    assert "Class weights:" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["class_weight"] == "balanced"
    assert metrics["test"]["per_class"]["spam"]["support"] == round(metrics["data"]["test"] / 8)


@pytest.mark.slow
def test_cut_reviews_are_counted(tmp_path):
    frame = sms_frame(rows=60)
    frame.loc[:9, "text"] = [" ".join(["word"] * 100) + f" {i}" for i in range(10)]
    data = tmp_path / "long.csv"
    frame.to_csv(data, index=False)
    result = run_main("--data", data, "--output-dir", tmp_path, *TINY_FLAGS, "--max-length", "50", "--no-baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["data"]["longer_than_max_length"] == 10


def test_a_model_file_without_class_names_is_read_as_negative_positive():
    """Model files written before the class names were saved still predict, with the names they meant."""
    import keras

    text = keras.Input(shape=(1,), dtype="string")
    vectorizer = keras.layers.TextVectorization(max_tokens=20, standardize=sa.standardize_text)
    vectorizer.adapt(["good film", "bad film"])
    classifier = sa.build_classifier(sa.TrainConfig(embedding_dim=4, units=2), 20)
    old_style = keras.Model(text, classifier(vectorizer(text)))
    assert sa.model_class_names(old_style) == ("negative", "positive")
    assert sa.predict_strings(old_style, ["good"]).shape == (1, 2)
