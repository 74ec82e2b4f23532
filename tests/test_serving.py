"""The model outside the script: the SavedModel for serving, model.keras with plain Keras, TensorBoard logs,
predict --explain and report.html."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, SMALL_BATCH_EPOCHS, TINY_CSV, build_once, read_scalars, run_main, trained

TEXTS = ["An absolute delight, the best film of the year!", "Dull, slow and badly acted. Avoid.", "It was fine.",
         ""]


@pytest.fixture(scope="session")
def blend_dir(tmp_path_factory):
    return build_once(tmp_path_factory, "blend", lambda output_dir: trained(output_dir, "--blend-weight", "0.5"))[0]


def fresh_python(code, *args, tmp_path):
    """Run `code` in a new Python process started outside the repository, so the script is not importable
    unless the code adds it; its last line of output, as JSON."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def script_probabilities(model_path, texts):
    import sentiment_analysis

    model = sentiment_analysis.load_model(model_path)
    probabilities = sentiment_analysis.predict_strings(model, texts)
    return probabilities, sentiment_analysis.predicted_names(probabilities,
                                                             sentiment_analysis.model_class_names(model), 0.5)


SERVE = """
import json, sys
import tensorflow as tf
served = []
for path in json.loads(sys.argv[1]):
    serving = tf.saved_model.load(path).signatures["serving_default"]
    spec = serving.structured_input_signature[1]["texts"]
    outputs = serving(texts=tf.constant(json.loads(sys.argv[2])))
    served.append({"input": [spec.shape.as_list(), spec.dtype.name],
                   "probabilities": outputs["probabilities"].numpy().tolist(),
                   "labels": [label.decode() for label in outputs["label"].numpy()]})
print(json.dumps({"served": served, "script_imported": "sentiment_analysis" in sys.modules}))
"""


@pytest.mark.slow
def test_saved_model_serves_raw_strings_like_predict_without_the_script(trained_dir, blend_dir, tmp_path):
    """The SavedModels of a neural model and of a blend, served by plain TensorFlow in one fresh process."""
    output_dirs = [trained_dir, blend_dir]
    for output_dir in output_dirs:
        assert (output_dir / "saved_model" / "1" / "saved_model.pb").is_file()
    paths = [str(output_dir / "saved_model" / "1") for output_dir in output_dirs]
    result = fresh_python(SERVE, json.dumps(paths), json.dumps(TEXTS), tmp_path=tmp_path)
    assert not result["script_imported"]
    for output_dir, served in zip(output_dirs, result["served"], strict=True):
        assert served["input"] == [[None], "string"]
        probabilities, labels = script_probabilities(output_dir / "model.keras", TEXTS)
        np.testing.assert_allclose(served["probabilities"], probabilities, atol=1e-5)
        assert served["labels"] == labels


LOAD = """
import json, sys
sys.path.insert(0, sys.argv[3])
import sentiment_analysis
import tensorflow as tf  # TensorFlow looks for Keras first, without loading it
import keras
texts = tf.constant(json.loads(sys.argv[2]))[:, None]
print(json.dumps([keras.models.load_model(path)(texts).numpy().tolist() for path in json.loads(sys.argv[1])]))
"""


@pytest.mark.slow
def test_model_file_loads_with_plain_keras_after_importing_the_script(trained_dir, blend_dir, tmp_path):
    """model.keras of a neural model and of a blend, loaded by keras.models.load_model in one fresh process."""
    import sentiment_analysis

    output_dirs = [trained_dir, blend_dir]
    paths = [str(output_dir / "model.keras") for output_dir in output_dirs]
    outputs = fresh_python(LOAD, json.dumps(paths), json.dumps(TEXTS), ROOT, tmp_path=tmp_path)
    for output_dir, loaded in zip(output_dirs, outputs, strict=True):
        probabilities, _ = script_probabilities(output_dir / "model.keras", TEXTS)
        np.testing.assert_allclose(sentiment_analysis.class_probabilities(loaded), probabilities, atol=1e-6)


@pytest.mark.slow
def test_tensorboard_holds_each_epoch_of_the_history(small_batch_run):
    tmp_path, stdout = small_batch_run
    history = pd.read_csv(tmp_path / "history.csv")
    train, validation = (read_scalars(tmp_path / "tensorboard" / part) for part in ("train", "validation"))
    epochs = history["epoch"].tolist()
    assert sorted(train["epoch_loss"]) == sorted(validation["epoch_loss"]) == epochs == list(
        range(1, SMALL_BATCH_EPOCHS + 1))
    for name, logged in [("loss", train["epoch_loss"]), ("accuracy", train["epoch_accuracy"]),
                         ("val_loss", validation["epoch_loss"]), ("val_accuracy", validation["epoch_accuracy"])]:
        np.testing.assert_allclose([logged[epoch] for epoch in epochs], history[name], rtol=1e-6)
    # The cosine schedule: from below 2e-3 after epoch 1 down to zero after the last.
    rates = [train["epoch_learning_rate"][epoch] for epoch in epochs]
    assert 0 < rates[0] < 2e-3 and rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0, abs=1e-9)
    # The loss of every 25th step of the whole run (its steps: its epochs of length-bucketed batches).
    steps = SMALL_BATCH_EPOCHS * int(re.search(rf"Plan: {SMALL_BATCH_EPOCHS} epochs of (\d+) batches", stdout)[1])
    assert sorted(train["batch_loss"]) == list(range(25, steps + 1, 25))
    assert all(0 < loss < 5 for loss in train["batch_loss"].values())


def explanation_blocks(stdout):
    """predict --explain into a pipe: a prediction line, word<TAB>score lines, an empty line; per text."""
    blocks = [block.splitlines() for block in stdout.strip("\n").split("\n\n")]
    return [(block[0].split("\t"), [line.split("\t") for line in block[1:]]) for block in blocks]


@pytest.mark.slow
def test_explain_prints_each_word_and_its_score_after_each_prediction(trained_dir):
    import sentiment_analysis

    texts = TEXTS[:3]
    plain = run_main("predict", "--model", trained_dir / "model.keras", *texts)
    result = run_main("predict", "--model", trained_dir / "model.keras", "--explain", *texts)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = explanation_blocks(result.stdout)
    assert [ "\t".join(prediction) for prediction, _ in blocks] == plain.stdout.splitlines()
    standardize = sentiment_analysis.text_standardizer(
        sentiment_analysis.load_model(trained_dir / "model.keras").get_layer("vectorizer"))
    for text, (_, words) in zip(texts, blocks):
        assert [word for word, _ in words] == sentiment_analysis.text_words(text, standardize)
        assert all(re.fullmatch(r"[+-]\d\.\d{4}", score) for _, score in words), words


def test_explain_colours_words_in_a_terminal():
    import sentiment_analysis

    explanation = sentiment_analysis.Explanation(["superb", "dull", "the", "fine"],
                                                 np.array([0.3, -0.29, 0.001, 0.05]), "positive")
    shown = sentiment_analysis.coloured_text(explanation)
    assert "\033[1;32msuperb\033[0m" in shown and "\033[1;31mdull\033[0m" in shown
    assert "\033[2;32mfine\033[0m" in shown and " the " in shown  # weak: dim; negligible: plain
    assert shown.startswith("    ")


@pytest.mark.slow
def test_explain_adds_the_strongest_words_to_a_csv(trained_dir, tmp_path):
    source = pd.read_csv(TINY_CSV).head(6)
    source.loc[2, "reviews"] = ""
    source.to_csv(tmp_path / "in.csv", index=False)
    result = run_main("predict", "--model", trained_dir / "model.keras", "--input", tmp_path / "in.csv",
                      "--output", tmp_path / "out.csv", "--explain")
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(scored.columns[-2:]) == ["top_words_for", "top_words_against"]
    assert scored.loc[2, "top_words_for"] == scored.loc[2, "top_words_against"] == ""
    entry = re.compile(r"\S+ \(([+-]\d\.\d{4})\)")
    for column, sign in (("top_words_for", 1), ("top_words_against", -1)):
        for value in scored[column].drop(index=2):
            items = value.split("; ") if value else []
            assert 1 <= len(items) <= 5 or not value
            assert all(entry.fullmatch(item) and entry.fullmatch(item)[1][0] == "+-"[sign < 0] for item in items), items
    assert any(scored["top_words_for"].drop(index=2)) and any(scored["top_words_against"].drop(index=2))


@pytest.mark.slow
def test_explain_on_a_csv_of_several_chunks(trained_dir, tmp_path):
    """A CSV longer than one chunk (5,000 rows in real use; 2 here) explains every chunk, not only the first."""
    import sentiment_analysis as sa

    source = pd.read_csv(TINY_CSV).head(5)
    source.to_csv(tmp_path / "in.csv", index=False)
    sa.predict_csv_command(trained_dir / "model.keras", tmp_path / "in.csv", tmp_path / "out.csv", None, None, None,
                           explain=True, chunk_rows=2)
    scored = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert len(scored) == 5 and list(scored["reviews"]) == list(source["reviews"])
    assert all(scored["top_words_for"] + scored["top_words_against"])


@pytest.mark.slow
def test_the_report_lists_figures_not_the_threshold(trained_dir):
    import html as html_module

    page = (trained_dir / "report.html").read_text()
    metrics_table = page.split("<h2>Test-set metrics</h2>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>([^<]+)</td>", metrics_table)
    assert rows == ["accuracy", "precision", "recall", "f1", "roc_auc"], rows
    assert "threshold" not in html_module.unescape(metrics_table)


@pytest.mark.slow
def test_explanations_agree_with_removing_each_top_word(trained_dir):
    """Occlusion: removing a word with a positive score should lower the positive probability, and the
    reverse; for most of the three strongest words of each text."""
    import sentiment_analysis

    model = sentiment_analysis.load_model(trained_dir / "model.keras")
    explainer = sentiment_analysis.build_explainer(model, sentiment_analysis.model_class_names(model))
    texts = pd.read_csv(TINY_CSV)["reviews"].head(8).tolist()
    agree = total = 0
    for text in texts:
        explanation = sentiment_analysis.explain_text(explainer, text, 1)
        probability = sentiment_analysis.predict_strings(model, [text])[0, 1]
        for index in np.argsort(-np.abs(explanation.scores))[:3]:
            word = explanation.words[index]
            without = " ".join(other for other in explanation.words if other != word)
            change = probability - sentiment_analysis.predict_strings(model, [without])[0, 1]
            agree += np.sign(change) == np.sign(explanation.scores[index])
            total += 1
    assert agree >= 0.7 * total, (agree, total)


@pytest.mark.slow
def test_blend_explanation_weighs_exact_baseline_terms(blend_dir):
    """The baseline's word scores add up exactly to p(text) - p(empty text), and a blend's explanation is the
    weighted sum of its two parts."""
    import sentiment_analysis
    import tensorflow as tf

    model = sentiment_analysis.load_model(blend_dir / "model.keras")
    explainer = sentiment_analysis.build_explainer(model, ("negative", "positive"))
    assert explainer.neural_weight == 0.5
    layers = sentiment_analysis.model_layers(model)
    text = pd.read_csv(TINY_CSV)["reviews"][0]
    words = sentiment_analysis.text_words(text, explainer.standardize)
    baseline = layers["tfidf_logistic"](layers["ngram_ids"](tf.constant([[text]]))).numpy()[0, 0]
    empty = 1 / (1 + np.exp(-float(np.asarray(explainer.tfidf.intercept))))
    baseline_scores = sentiment_analysis.baseline_word_scores(explainer, words, 1)
    assert baseline_scores.sum() == pytest.approx(baseline - empty, abs=1e-5)
    assert np.count_nonzero(baseline_scores) > len(words) / 2
    neural_scores = sentiment_analysis.neural_word_scores(explainer, text, 1, len(words))
    explanation = sentiment_analysis.explain_text(explainer, text, 1)
    np.testing.assert_allclose(explanation.scores, 0.5 * neural_scores + 0.5 * baseline_scores, atol=1e-9)


@pytest.mark.slow
def test_report_is_one_self_contained_page_naming_every_figure_and_metric(blend_dir):
    page = (blend_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page), "the page must need no network"
    assert "http://" not in page and "https://" not in page
    for figure in ("confusion_matrix.png", "roc_curve.png", "training_history.png", "learning_curve.png"):
        assert f'alt="{figure}"' in page
    assert page.count('src="data:image/png;base64,') == 4
    for metric in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert f"<td>{metric}</td>" in page
    for model in ("blend", "baseline", "lstm"):
        assert f"<th>{model}</th>" in page
    errors = pd.read_csv(blend_dir / "errors.csv")
    assert page.count('class="mistake"') == min(20, len(errors))
    assert page.count("<span style=\"background:rgba(") > 0
