"""Pretrained knowledge: word-vector files (GloVe, word2vec binary, fastText .vec) as the starting embedding."""

import json

import numpy as np
import pytest

from conftest import TINY_CSV, TINY_FLAGS, assert_user_error, run_main

WORDS = ["the", "movie", "film", "good", "bad", "great", "and", "notaword"]


def vectors(size=6):
    return {word: np.round(np.random.default_rng(index).normal(0, 0.4, size), 5).astype(np.float32)
            for index, word in enumerate(WORDS)}


def write_glove(path, table):
    path.write_text("".join(f"{word} {' '.join(map(str, vector))}\n" for word, vector in table.items()))


def write_vec(path, table):
    size = len(next(iter(table.values())))
    path.write_text(f"{len(table)} {size}\n" + "".join(f"{word} {' '.join(map(str, vector))}\n"
                                                         for word, vector in table.items()))


def write_word2vec_binary(path, table):
    from gensim.models import KeyedVectors

    keyed = KeyedVectors(vector_size=len(next(iter(table.values()))))
    keyed.add_vectors(list(table), np.array(list(table.values())))
    keyed.save_word2vec_format(str(path), binary=True)


FORMATS = {"glove.txt": write_glove, "vectors.bin": write_word2vec_binary, "wiki.vec": write_vec}


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMATS)
def test_each_file_format_starts_the_embedding_from_its_vectors(name, tmp_path):
    import sentiment_analysis as sa

    table = vectors()
    FORMATS[name](tmp_path / name, table)
    config = sa.resolve_embedding_dim(sa.TrainConfig(data=str(TINY_CSV), embeddings=str(tmp_path / name),
                                                     vocab_size=2000, max_length=80))
    assert config.embedding_dim == 6
    data = sa.load_dataset(config)
    inputs = sa.prepare_inputs(sa.split_dataset(data, config), config, replicas=1, num_classes=2)
    vocabulary = inputs.vocabulary
    in_file = [word for word in WORDS if word in vocabulary]
    assert len(in_file) == len(WORDS) - 1  # all but "notaword"
    for word in in_file:
        np.testing.assert_array_equal(inputs.embedding_matrix[vocabulary.index(word)], table[word])
    assert not inputs.embedding_matrix[0].any()  # padding
    coverage = inputs.embedding_coverage
    assert coverage["vocabulary_covered"] == round(len(in_file) / (len(vocabulary) - 2), 4)
    tokens = inputs.train_ids[inputs.train_ids > 0]
    covered = np.isin(tokens, [vocabulary.index(word) for word in in_file]).mean()
    assert coverage["training_tokens_covered"] == pytest.approx(covered, abs=1e-4)
    assert coverage["file_words"] == len(WORDS) and coverage["dimension"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMATS)
def test_a_word_vector_file_trains_and_reports_its_coverage(name, tmp_path):
    FORMATS[name](tmp_path / name, vectors())
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path / "out", *TINY_FLAGS, "--no-baseline",
                      "--embeddings", tmp_path / name)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The file covers" in result.stdout and "of the training tokens" in result.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["embedding_dim"] == 6 and metrics["config"]["embeddings"] == str(tmp_path / name)
    coverage = metrics["data"]["embedding_coverage"]
    assert 0 < coverage["vocabulary_covered"] < 1 and 0 < coverage["training_tokens_covered"] < 1


def test_word_vector_file_mistakes_are_one_line(tmp_path):
    flags = ["--data", TINY_CSV, "--output-dir", tmp_path / "out", *TINY_FLAGS]
    write_glove(tmp_path / "glove.txt", vectors())
    assert_user_error(run_main(*flags, "--embeddings", tmp_path / "glove.txt", "--embedding-dim", "8"),
                      "--embedding-dim 8 conflicts", "6 dimensions")
    assert_user_error(run_main(*flags, "--embeddings", tmp_path / "missing.txt"),
                      "--embeddings must be word2vec, random, an existing word-vector file")
    assert_user_error(run_main(*flags, "--embeddings", TINY_CSV), "is not a word-vector file")
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("the 0.1 0.2 0.3\nfilm 0.4 0.5\n")
    assert_user_error(run_main(*flags, "--embeddings", ragged), "cannot read word vectors")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_wordpiece_tokens_train_blend_and_predict_the_same_after_loading(tmp_path):
    import sentiment_analysis as sa
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the WordPiece op, which the SavedModel needs)
    import pandas as pd

    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, *TINY_FLAGS, "--vocab-size", "400",
                      "--tokenizer", "wordpiece", "--arch", "gru", "--blend-weight", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Learning a WordPiece vocabulary" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["tokenizer"] == "wordpiece" and metrics["model"] == "blend"
    model = sa.load_model(tmp_path / "model.keras")
    assert model.get_layer("class_names").settings == metrics["config"]  # the file says how it was made
    vectorizer = sa.model_layers(model)["vectorizer"]
    pieces = vectorizer.get_vocabulary()
    assert pieces[:2] == ["[PAD]", "[UNK]"] and len(pieces) <= 400
    assert any(piece.startswith("##") for piece in pieces), "subword pieces, not only words"
    ids = np.asarray(vectorizer(tf.constant([["Unwatchable!"]])))[0]
    assert len(ids) == 80 and ids[0] > 1 and ids[-1] == 0  # pieces, then padding

    # The loaded file gives the probabilities the run computed in memory (errors.csv, 4 decimals).
    errors = pd.read_csv(tmp_path / "errors.csv")
    loaded = sa.predict_strings(model, errors["text"].tolist())[:, 1]
    np.testing.assert_allclose(loaded, errors["probability_positive"], atol=6e-5)
    served = tf.saved_model.load(str(tmp_path / "saved_model" / "1")).signatures["serving_default"](
        texts=tf.constant(errors["text"].tolist()))
    np.testing.assert_allclose(served["probabilities"].numpy()[:, 1], loaded, atol=1e-5)

    texts = ["A wonderfully unwatchable film!", "Superb."]
    plain = run_main("predict", "--model", tmp_path / "model.keras", *texts)
    explained = run_main("predict", "--model", tmp_path / "model.keras", "--explain", *texts)
    assert plain.returncode == explained.returncode == 0, explained.stderr[-3000:]
    words = [line.split("\t")[0] for line in explained.stdout.splitlines() if line.count("\t") == 1]
    assert words == ["a", "wonderfully", "unwatchable", "film", "!", "superb"]  # pieces summed per word


@pytest.fixture(scope="module")
def tiny_bert_preset(tmp_path_factory):
    """A two-layer BERT with a small hidden size and a vocabulary of the tiny CSV's words, saved as a local
    KerasHub preset directory, as save_to_preset writes one (no download)."""
    import collections
    import re

    import keras_hub
    import pandas as pd

    texts = pd.read_csv(TINY_CSV)["reviews"]
    counts = collections.Counter(word for text in texts for word in re.findall(r"[a-z]+|[!?]", text.lower()))
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [word for word, _ in counts.most_common(400)]
    vocabulary += ["##s", "##ed", "##ing", "##ly"]
    directory = tmp_path_factory.mktemp("tiny_bert")
    keras_hub.models.BertBackbone(vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=16,
                                  intermediate_dim=32, max_sequence_length=128).save_to_preset(str(directory))
    keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True).save_to_preset(str(directory))
    return directory


@pytest.mark.slow
def test_bert_fine_tunes_from_a_local_preset_and_predicts_from_its_file(tiny_bert_preset, tmp_path):
    import sentiment_analysis as sa

    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, "--no-show", "--epochs", "1",
                      "--max-length", "64", "--arch", "bert", "--bert-preset", tiny_bert_preset,
                      "--blend-weight", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    config = metrics["config"]
    assert metrics["model"] == "blend" and 0 <= metrics["bert"]["accuracy"] <= 1
    assert config["arch"] == "bert" and config["bert_preset"] == str(tiny_bert_preset)
    assert (config["learning_rate"], config["batch_size"], config["max_length"]) == (5e-5, 32, 64)
    assert metrics["training"]["epochs_run"] == 1

    model = sa.load_model(tmp_path / "model.keras")
    layers = sa.model_layers(model)
    assert type(layers["bert_backbone"]).__name__ == "BertBackbone"
    ids = np.asarray(layers["vectorizer"](__import__("tensorflow").constant([["A good film!"]])))[0]
    vocabulary = layers["vectorizer"].get_vocabulary()
    assert vocabulary[ids[0]] == "[CLS]" and vocabulary[ids[np.count_nonzero(ids) - 1]] == "[SEP]"
    texts = ["A good film!", "Bad, bad, bad."]
    predicted = run_main("predict", "--model", tmp_path / "model.keras", *texts)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [line.split("\t") for line in predicted.stdout.splitlines()]
    probabilities = sa.predict_strings(model, texts)[:, 1]
    assert [float(row[1]) for row in rows] == pytest.approx(probabilities, abs=1e-4)
    # Explanations: integrated gradients over BERT's token embedding, pieces summed per word, [CLS] and [SEP]
    # left out; plus the baseline's terms, half and half.
    explained = run_main("predict", "--model", tmp_path / "model.keras", "--explain", *texts)
    assert explained.returncode == 0, explained.stderr[-3000:]
    words = [line.split("\t")[0] for line in explained.stdout.splitlines() if line.count("\t") == 1]
    assert words == ["a", "good", "film", "!", "bad", "bad", "bad"]
    explainer = sa.make_explainer(model, sa.model_class_names(model))
    neural = sa.neural_word_scores(explainer, texts[0], 1, 4)
    assert np.count_nonzero(neural) == 4 and explainer.special_ids == {ids[0], ids[np.count_nonzero(ids) - 1]}


def test_bert_settings_come_from_its_defaults_unless_given_and_a_bad_preset_is_one_line(tmp_path):
    import sentiment_analysis as sa

    def config(*flags):
        return sa.config_from_args(sa.build_train_parser().parse_args(list(flags)))

    bert = config("--arch", "bert")
    assert (bert.learning_rate, bert.batch_size, bert.epochs, bert.max_length) == (5e-5, 32, 3, 256)
    assert config("--arch", "bert", "--learning-rate", "1e-4", "--max-length", "128").learning_rate == 1e-4
    assert config("--arch", "gru").learning_rate == sa.TrainConfig().learning_rate
    flags = ["--data", TINY_CSV, "--output-dir", tmp_path, *TINY_FLAGS, "--arch", "bert"]
    assert_user_error(run_main(*flags, "--bert-preset", tmp_path / "no_such_preset"),
                      "--bert-preset must be a KerasHub preset name or an existing directory")
    assert_user_error(run_main(*flags, "--bert-preset", tmp_path), "cannot load the BERT preset")
    assert_user_error(run_main(*flags, "--embeddings", "word2vec"), "does not apply to --arch bert")
