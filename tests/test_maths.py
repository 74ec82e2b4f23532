"""The pieces that every reported figure rests on, pinned in process: the gradient sum across replicas, the
length-sorted scoring, the batch count, the model the flags build, the text cleaning and the blend choice."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import sentiment_analysis as sa
from conftest import TINY_CSV, TINY_FLAGS, run_main, split


def tiny_texts(count=60):
    rows = pd.read_csv(TINY_CSV).head(count)
    return rows["reviews"].to_numpy(object), (rows["sentiment"] == "positive").to_numpy(np.int32)


def one_step_each(strategy, initial_weights, token_ids, labels, config):
    """The script's own training step and validation step, once each on the same batches under `strategy`:
    the weights after the step, the training sums and the validation sums (loss, correct, reviews)."""
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        classifier = sa.build_classifier(config, 50)
        classifier.set_weights(initial_weights)
        optimizer = sa.build_optimizer(sa.OptimizerRecipe.of(config), sa.TrainingPlan(32, 1, 4, 1, 5, "test"))
        optimizer.build(classifier.trainable_variables)
    steps = sa.build_step_functions(classifier, optimizer, strategy)
    train_step, validation_step = steps.train, steps.validation

    def batches():
        dataset = sa.build_training_dataset(sa.ReviewIds.from_padded(token_ids), labels, 8, shuffle_seed=None,
                                            pad_to_full_batches=replicas > 1)
        return iter(strategy.experimental_distribute_dataset(dataset))

    validation = [float(value) for value in validation_step(batches())]
    training = [float(value) for value in train_step(batches())]
    return classifier.get_weights(), training, validation


@pytest.mark.slow
@pytest.mark.parametrize("reviews", [8, 7, 1])
def test_one_replica_and_two_replicas_compute_the_same_step(reviews):
    """The distributed step's hand-written maths: the same weights and the same batch give the same loss,
    metrics and updated weights on one replica and on two logical CPUs, also for a batch that does not divide
    by two (7 reviews: the two replicas get a padded batch of 8, one review of weight 0) or that leaves one
    replica with padding only (1 review)."""
    config = sa.TrainConfig(vocab_size=50, embedding_dim=8, units=6, spatial_dropout=0.0, lr_schedule="constant")
    keras.utils.set_random_seed(1)
    initial = sa.build_classifier(config, 50).get_weights()
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, 50, (reviews, 12)).astype(np.int32)
    token_ids[:, 9:] = 0  # right padding, as the real batches have
    labels = (np.arange(reviews) % 2).astype(np.float32)

    one = one_step_each(tf.distribute.get_strategy(), initial, token_ids, labels, config)
    mirrored = sa.choose_strategy(2, role=None)  # what --cpu-replicas 2 uses
    assert mirrored.num_replicas_in_sync == 2
    two = one_step_each(mirrored, initial, token_ids, labels, config)

    (weights_one, training_one, validation_one), (weights_two, training_two, validation_two) = one, two
    assert training_one[2] == training_two[2] == validation_one[2] == validation_two[2] == reviews
    np.testing.assert_allclose(training_one, training_two, rtol=1e-5)
    np.testing.assert_allclose(validation_one, validation_two, rtol=1e-5)
    assert any(np.abs(after - before).max() > 1e-4 for after, before in zip(weights_one, initial)), "it moved"
    for after_one, after_two in zip(weights_one, weights_two):
        np.testing.assert_allclose(after_one, after_two, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_length_sorted_scoring_matches_the_saved_model_row_by_row():
    """Every reported test metric comes from predict_token_ids; it must equal the exported model on raw text."""
    texts, _ = tiny_texts()
    config = sa.TrainConfig(vocab_size=300, max_length=40, embedding_dim=8, units=6)
    keras.utils.set_random_seed(2)
    vectorizer = sa.learned_vectorizer(texts, sa.ModelRecipe.of(config), config.max_length)
    classifier = sa.build_classifier(config, len(vectorizer.get_vocabulary()))
    by_ids = sa.predict_token_ids(classifier, sa.vectorize(vectorizer, texts, config.max_length),
                                   batch_size=7)
    by_text = sa.predict_strings(sa.build_predictor(vectorizer, classifier, sa.CLASS_NAMES), list(texts))
    assert by_ids.shape == by_text.shape == (len(texts), 2)
    assert np.ptp(by_ids) > 0, "a model that scores every review alike would prove nothing"
    np.testing.assert_allclose(by_ids, by_text, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 32, 200])
@pytest.mark.parametrize("pad", [False, True])
def test_every_review_is_in_exactly_one_batch_and_count_batches_knows_how_many(batch_size, pad):
    rng = np.random.default_rng(batch_size)
    max_length = 60
    lengths = rng.integers(1, max_length + 1, 150)
    token_ids = np.zeros((150, max_length), dtype=np.int32)
    for row, length in enumerate(lengths):
        token_ids[row, :length] = rng.integers(2, 100, length)
    token_ids[:, 0] = np.arange(150) + 1000  # each review's own first token, to recognise it in the batches
    labels = rng.integers(0, 2, 150)
    dataset = sa.build_training_dataset(sa.ReviewIds.from_padded(token_ids), labels, batch_size, shuffle_seed=3,
                                        pad_to_full_batches=pad)
    assert dataset.options().autotune.enabled is False  # its autotuning slowed epochs by 1.35x (docs/RESULTS.md)
    batches = list(dataset.as_numpy_iterator())
    boundaries = sa.bucket_boundaries(max_length, 150, batch_size)
    assert len(batches) == sa.count_batches(lengths, batch_size, boundaries) == int(dataset.cardinality())
    real_reviews = []
    for ids, batch_labels, weights in batches:
        assert len(ids) == len(batch_labels) == len(weights)
        assert len(ids) == batch_size if pad else 1 <= len(ids) <= batch_size
        real = weights == 1
        assert set(np.unique(weights)) <= {0.0, 1.0} and real.any()
        real_reviews.extend(ids[real, 0] - 1000)
        np.testing.assert_array_equal(batch_labels[real], labels[ids[real, 0] - 1000])
    assert sorted(real_reviews) == list(range(150)), "every review once, padding never"


@pytest.mark.parametrize("flags, expected", [
    ([], ["LSTM(100)"]),
    (["--arch", "gru"], ["GRU(100)"]),
    (["--arch", "bilstm", "--units", "7"], ["Bidirectional(LSTM(7))"]),
    (["--arch", "lstm", "--layers", "3", "--units", "5"], ["LSTM(5)"] * 3),
])
def test_flags_build_the_layers_they_name(flags, expected):
    from test_training import recurrent_layers

    config = sa.config_from_args(sa.build_train_parser().parse_args(flags))
    classifier = sa.build_classifier(config, 100, 2, sa.Derived.of(config, sa.ARCHITECTURES[config.arch]).embedding_dim)
    assert recurrent_layers(classifier) == expected
    stacked = [layer for layer in classifier.layers if hasattr(layer, "return_sequences")]
    assert [layer.return_sequences for layer in stacked] == [True] * (len(expected) - 1) + [False]
    assert type(classifier.layers[1]).__name__ == "Embedding" and classifier.layers[1].output_dim == 128
    assert type(classifier.layers[2]).__name__ == "SpatialDropout1D" and classifier.layers[2].rate == 0.2
    output = classifier.get_layer("probability")
    assert output.units == 1 and output.activation.__name__ == "sigmoid"


@pytest.mark.parametrize("raw, expected", [
    ("Great film!<br /><br />Loved it", "great film ! loved it"),
    ("Why?? Really?!", "why ? ? really ? !"),
    ("Don't miss it, it's the director's best", "dont miss it its the directors best"),
    ("Amélie, Ça ira: Große Kunst", "amélie ça ira große kunst"),
    ("10/10 in 2005 -- 3.5 stars", "10 10 in 2005 3 5 stars"),
    ("<i>Italic</i> and <a href='x'>a link</a>", " italic and a link "),
])
def test_standardize_text(raw, expected):
    cleaned = sa.standardize_text(tf.constant([raw])).numpy()[0].decode("utf-8")
    assert cleaned.split() == expected.split()
    assert sa.standardized_strings(np.array([raw], dtype=object), sa.standardize_text) == [cleaned]


def test_the_vectorizer_owns_the_cleaning_of_text_and_the_rest_reads_it_from_there():
    """Another cleaning in the vectorizer (here none: case and hyphens kept) is the one the baseline's strings and
    the count of cut reviews use, not the script's standardize_text."""
    def as_given(text):
        return text

    review = np.array(["A well-made Film"], dtype=object)  # 3 words as given, 4 once standardize_text splits "-"
    vectorizer = keras.layers.TextVectorization(max_tokens=50, standardize=as_given, output_sequence_length=3)
    vectorizer.adapt(tf.constant(review.tolist()))
    assert sa.text_standardizer(vectorizer) is as_given
    assert sa.standardized_strings(review, sa.text_standardizer(vectorizer)) == ["A well-made Film"]
    assert sa.count_truncated(vectorizer, review, 3) == 0
    standard = keras.layers.TextVectorization(max_tokens=50, standardize=sa.standardize_text, output_sequence_length=3)
    standard.adapt(tf.constant(review.tolist()))
    assert sa.count_truncated(standard, review, 3) == 1
    assert sa.text_words(review[0], sa.text_standardizer(standard)) == ["a", "well", "made", "film"]
    assert sa.WordPieceVectorizer.standardize is sa.standardize_text  # the subword vectorizers' own
    foreign = keras.layers.TextVectorization(max_tokens=50)  # Keras' "lower_and_strip_punctuation", a name
    with pytest.raises(sa.UserError, match="does not know"):
        sa.text_standardizer(foreign)


def test_baselines_fitted_side_by_side_are_the_ones_fitted_in_turn(monkeypatch):
    rows = pd.read_csv(TINY_CSV)
    texts = sa.standardized_strings(rows["reviews"].to_numpy(), sa.standardize_text)
    labels = (rows["sentiment"] == "positive").to_numpy().astype(np.int64)
    parts = [(texts[:150], labels[:150]), (texts[50:], labels[50:]), (texts[::2], labels[::2])]
    recipe = sa.BaselineRecipe(seed=3)
    together = sa.fit_baselines(parts, recipe)
    in_turn = [sa.fit_baseline(part_texts, part_labels, recipe) for part_texts, part_labels in parts]
    for parallel, sequential in zip(together, in_turn):
        np.testing.assert_array_equal(parallel.predict_proba(texts), sequential.predict_proba(texts))
    # One core: fitted one after another in this process, the same models again.
    monkeypatch.setattr(sa.joblib, "cpu_count", lambda: 1)
    for one_core, sequential in zip(sa.fit_baselines(parts, recipe), in_turn):
        np.testing.assert_array_equal(one_core.predict_proba(texts), sequential.predict_proba(texts))


@pytest.mark.slow
def test_a_run_chooses_the_blend_weight_on_the_validation_split(tmp_path):
    """Not only the helper: the weight a whole run records is the one that minimizes log loss on the validation
    split (equal weights when that is not better beyond noise; all on one part, when that blend is less accurate
    than the part alone beyond noise), as recomputed here from the two parts inside the saved blend."""
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, *TINY_FLAGS, "--blend-weight", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    config = sa.TrainConfig(data=str(TINY_CSV), **{key: metrics["config"][key] for key in ("seed",)})
    validation = split(sa.load_dataset(config), config).validation

    blend = sa.load_model(tmp_path / "model.keras")
    neural = sa.predict_strings(blend.get_layer("sentiment_model"), list(validation.texts))
    text = tf.reshape(tf.constant(list(validation.texts)), (-1, 1))
    scorer, ngram_ids = blend.get_layer("tfidf_logistic"), blend.get_layer("ngram_ids")
    baseline = sa.class_probabilities(scorer(ngram_ids(text)))
    weight = sa.choose_blend_weight(validation.labels, neural, baseline)
    if weight != sa.EQUAL_BLEND_WEIGHT:
        # Equal weights unless the log-loss weight is better beyond noise (paired bootstrap of the rows' losses).
        losses = [-np.log(np.clip(sa.blend_probabilities(w, neural, baseline)[np.arange(len(validation.labels)),
                                                                              validation.labels], 1e-7, 1))
                  for w in (weight, sa.EQUAL_BLEND_WEIGHT)]
        if sa.mean_interval(losses[0] - losses[1])[1] >= 0:
            weight = sa.EQUAL_BLEND_WEIGHT
    accuracy = {name: round(float(np.mean(sa.predicted_labels(values) == validation.labels)), 4)
                for name, values in (("lstm", neural), ("baseline", baseline),
                                     ("blend", sa.blend_probabilities(weight, neural, baseline)))}
    part = "lstm" if accuracy["lstm"] > accuracy["baseline"] else "baseline"
    ahead = sa.compare_models(validation.labels, neural if part == "lstm" else baseline,
                              sa.blend_probabilities(weight, neural, baseline), (part, "blend"), "validation")
    if ahead.difference > 0 and not ahead.level:
        # A blend less accurate than a part alone, beyond noise, gives that part all the weight.
        weight = 1.0 if part == "lstm" else 0.0
        accuracy["blend"] = accuracy[part]
    # The reason recorded says which of the three rules gave the weight.
    if weight in (0.0, 1.0) and ahead.difference > 0 and not ahead.level:
        assert metrics["blend_chosen"].startswith(f"all on the {part}: alone it is more accurate")
    elif weight == sa.EQUAL_BLEND_WEIGHT != sa.choose_blend_weight(validation.labels, neural, baseline):
        assert metrics["blend_chosen"].startswith("equal weights: the validation split cannot tell")
    else:
        assert metrics["blend_chosen"] == "the lowest validation log loss"
    assert metrics["blend_weight"] == weight
    assert metrics["validation_accuracy"] == accuracy
    blended = sa.blend_probabilities(weight, neural, baseline)
    # The saved blend is the same formula as the reported one.
    np.testing.assert_allclose(sa.predict_strings(blend, list(validation.texts)), blended, atol=1e-5)


def test_the_figures_named_for_each_kind_of_model_are_the_ones_computed_and_reported():
    import sentiment_analysis as sa

    labels = np.array([0, 1, 1, 0, 2, 2])
    three = np.array([[.7, .2, .1], [.1, .8, .1], [.3, .4, .3], [.5, .4, .1], [.1, .1, .8], [.2, .5, .3]])
    two = np.column_stack([1 - three[:, 1], three[:, 1]])
    for names, probabilities, y in ((("neg", "pos"), two, labels.clip(0, 1)), (("a", "b", "c"), three, labels)):
        scores = sa.compute_metrics(y, probabilities, names)
        assert all(isinstance(scores[name], float) for name in sa.figure_names(names))
        rows = sa.metric_rows({"model": scores}, names)
        assert [row[0] for row in rows] == list(sa.figure_names(names)) and "threshold" not in dict(rows)
    assert sa.summary_table({"lstm": scores}, ("a", "b", "c")).split("\n")[0].split() == ["model", *sa.MULTICLASS_TABLE]


@pytest.mark.parametrize("classes", [2, 3])
def test_baseline_word_scores_come_from_the_blend_layers_own_tfidf_and_add_up_to_its_change(classes):
    """The explanation's TF-IDF is TfidfLogistic's (one place), and matches scikit-learn's formula written out
    here: (1 + log count) * idf, L2-normalized, times the coefficients; the words' scores add up to p(text) -
    p(empty text) for the explained class."""
    rng = np.random.default_rng(0)
    vocabulary = ["good", "film", "bad", "good film", "bad film"]
    outputs = 1 if classes == 2 else classes
    layer = sa.TfidfLogistic(len(vocabulary) + 2, outputs)
    layer.build(None)
    idf = np.r_[0, 0, rng.uniform(1, 3, len(vocabulary))].astype(np.float32)
    coef = rng.normal(size=(len(vocabulary) + 2,) + (() if outputs == 1 else (outputs,))).astype(np.float32)
    intercept = np.float32(0.3) if outputs == 1 else rng.normal(size=outputs).astype(np.float32)
    layer.set_weights([idf, coef, intercept])
    explainer = sa.Explainer(None, None, tuple(f"c{i}" for i in range(classes)), None,
                             ngram_index={gram: i + 2 for i, gram in enumerate(vocabulary)}, ngram_lengths=2,
                             tfidf=layer, coef=np.asarray(coef, dtype=np.float64))
    words, target = ["good", "film", "good", "film", "bad", "plot"], classes - 1
    scores = sa.baseline_word_scores(explainer, words, target)

    counts = {2: 2, 3: 2, 4: 1, 5: 2}  # good, film, bad, "good film" (twice); "bad film" never, "plot" unknown
    ids = np.array(list(counts))
    weights = (1 + np.log([counts[i] for i in ids])) * idf[ids]
    weights = weights / np.sqrt(np.sum(weights**2))

    def probabilities(logits):
        return 1 / (1 + np.exp(-logits)) if outputs == 1 else np.exp(logits) / np.exp(logits).sum()

    logits = weights @ coef[ids] + intercept
    column = 0 if outputs == 1 else target
    change = (np.atleast_1d(probabilities(logits))[column]
              - np.atleast_1d(probabilities(np.asarray(intercept, dtype=np.float64)))[column])
    assert scores.sum() == pytest.approx(change, abs=1e-6)
    assert scores[5] == 0 and np.count_nonzero(scores[:5]) == 5
    layer_probabilities = layer(tf.constant([[2, 3, 2, 3, 4, 5, 5]])).numpy()[0]
    np.testing.assert_allclose(layer_probabilities, np.atleast_1d(probabilities(logits)), rtol=1e-5)


def test_review_ids_keep_each_review_without_its_padding():
    padded = np.array([[5, 6, 7, 0], [0, 0, 0, 0], [9, 0, 0, 0], [3, 1, 4, 2]], dtype=np.int32)
    ids = sa.ReviewIds.from_padded(padded)
    assert len(ids) == 4 and ids.max_length == 4
    assert ids.tokens.tolist() == [5, 6, 7, 9, 3, 1, 4, 2] and ids.ends.tolist() == [3, 3, 4, 8]
    assert [review.tolist() for review in ids] == [[5, 6, 7], [], [9], [3, 1, 4, 2]]
    np.testing.assert_array_equal(ids.padded(np.arange(4), width=4), padded)  # round trip
    np.testing.assert_array_equal(ids.padded(np.array([2, 0])), [[9, 0, 0], [5, 6, 7]])  # its longest's width
    np.testing.assert_array_equal(ids.padded(np.array([1])), [[0]])  # an empty review is one padding step
    again = sa.ReviewIds.concatenate([ids.take(np.array([3])), ids.take(np.array([0, 1]))], 4)
    assert [review.tolist() for review in again] == [[3, 1, 4, 2], [5, 6, 7], []]
    assert again == sa.ReviewIds.from_padded(padded[[3, 0, 1]]) and again != ids.take(np.array([3, 0, 2]))
    assert sa.ReviewIds.concatenate([], 4).tokens.size == 0 and len(ids.take(np.arange(0))) == 0
    assert sa.review_lengths(ids).tolist() == [3, 1, 1, 4]  # an empty review still takes one step


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_length_batches_are_the_batches_tf_data_buckets_make(batch_size):
    rng = np.random.default_rng(batch_size)
    lengths = rng.integers(1, 61, 300)
    order = rng.permutation(300)
    boundaries = sa.bucket_boundaries(60, 300, batch_size)
    ours = sa.length_batches(lengths, batch_size, boundaries, order)
    reviews = tf.data.Dataset.from_tensor_slices(order).bucket_by_sequence_length(
        lambda row: tf.gather(tf.constant(lengths, tf.int32), row), boundaries, [batch_size] * (len(boundaries) + 1))
    theirs = [batch.tolist() for batch in reviews.as_numpy_iterator()]
    full = [batch.tolist() for batch in ours if len(batch) == batch_size]
    assert full == [batch for batch in theirs if len(batch) == batch_size]  # the same, in the same order
    assert sorted(map(sorted, (batch.tolist() for batch in ours))) == sorted(map(sorted, theirs))
    assert len(ours) == sa.count_batches(lengths, batch_size, boundaries)
