"""Pretrained knowledge: word-vector files (GloVe, word2vec binary, fastText .vec) as the starting embedding."""

import json

import numpy as np
import pytest

from conftest import TINY_CSV, TINY_FLAGS, assert_user_error, run_main, split

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
    config = sa.TrainConfig(data=str(TINY_CSV), embeddings=str(tmp_path / name), vocab_size=2000, max_length=80)
    derived = sa.Derived.of(config, sa.ARCHITECTURES[config.arch])
    assert derived.embedding_dim == 6
    data = sa.load_dataset(config)
    inputs = sa.prepare_inputs(split(data, config), config, sa.ARCHITECTURES[config.arch], derived,
                               replicas=1, num_classes=2)
    vocabulary = inputs.vocabulary
    in_file = [word for word in WORDS if word in vocabulary]
    assert len(in_file) == len(WORDS) - 1  # all but "notaword"
    for word in in_file:
        np.testing.assert_array_equal(inputs.embedding_matrix[vocabulary.index(word)], table[word])
    assert not inputs.embedding_matrix[0].any()  # padding
    coverage = inputs.embedding_coverage
    assert coverage["vocabulary_covered"] == round(len(in_file) / (len(vocabulary) - 2), 4)
    tokens = inputs.train_ids.tokens
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
    started = metrics["started_from"]
    assert started["vectors"] == str((tmp_path / name).resolve()) and started["dimensions"] == 6
    assert started["file_bytes"] == (tmp_path / name).stat().st_size


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
    # The file says how it was made and what it started from.
    assert model.get_layer("class_names").settings == {**metrics["config"], "started_from": metrics["started_from"]}
    assert metrics["started_from"] == {"embeddings": "word2vec",
                                       "vectors": "Word2Vec trained on this run's training split"}
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
    vocabulary += ["##s", "##ed", "##ing", "##ly", ",", "."]
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
    # Explanations: integrated gradients over BERT's token embedding, pieces summed per word of BERT's own
    # tokenizer (punctuation marks are words), [CLS] and [SEP] left out; plus the baseline's terms, half and half.
    explained = run_main("predict", "--model", tmp_path / "model.keras", "--explain", *texts)
    assert explained.returncode == 0, explained.stderr[-3000:]
    words = [line.split("\t")[0] for line in explained.stdout.splitlines() if line.count("\t") == 1]
    assert words == ["a", "good", "film", "!", "bad", ",", "bad", ",", "bad", "."]
    explainer = sa.build_explainer(model, sa.model_class_names(model))
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


HIDDEN, INTERMEDIATE, LAYERS, POSITIONS = 16, 32, 2, 64
PUNCTUATION = list("!?,.'()-\";:/")


def tiny_csv_vocabulary():
    import collections
    import re

    import pandas as pd

    texts = pd.read_csv(TINY_CSV)["reviews"]
    counts = collections.Counter(word for text in texts for word in re.findall(r"[a-z]+", text.lower()))
    words = [word for word, _ in counts.most_common(500)]
    words += [word for word in ("wasn", "t", "i", "d", "say") if word not in words]  # the tests' own texts
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + PUNCTUATION + words + ["##s", "##ed", "##ing", "##ly"]


def write_hugging_face_bert(directory, vocabulary, tokenizer="vocab.txt", positions=POSITIONS):
    """A tiny random BERT as Hugging Face's save_pretrained writes one: config.json, model.safetensors with
    BertModel's weight names and shapes (a Linear's weight is [out, in]), tokenizer_config.json, and the
    vocabulary as vocab.txt or inside tokenizer.json."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def dense(rows, columns):
        return rng.normal(0, 0.02, (rows, columns)).astype(np.float32)

    def ones(size):
        return np.ones(size, np.float32)

    def zeros(size):
        return np.zeros(size, np.float32)

    tensors = {"embeddings.word_embeddings.weight": dense(len(vocabulary), HIDDEN),
               "embeddings.position_embeddings.weight": dense(positions, HIDDEN),
               "embeddings.token_type_embeddings.weight": dense(2, HIDDEN),
               "embeddings.LayerNorm.weight": ones(HIDDEN), "embeddings.LayerNorm.bias": zeros(HIDDEN),
               "pooler.dense.weight": dense(HIDDEN, HIDDEN), "pooler.dense.bias": zeros(HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"encoder.layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            tensors[f"{prefix}{name}.weight"], tensors[f"{prefix}{name}.bias"] = dense(HIDDEN, HIDDEN), zeros(HIDDEN)
        tensors[f"{prefix}intermediate.dense.weight"] = dense(INTERMEDIATE, HIDDEN)
        tensors[f"{prefix}intermediate.dense.bias"] = zeros(INTERMEDIATE)
        tensors[f"{prefix}output.dense.weight"] = dense(HIDDEN, INTERMEDIATE)
        tensors[f"{prefix}output.dense.bias"] = zeros(HIDDEN)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"{prefix}{norm}.weight"], tensors[f"{prefix}{norm}.bias"] = ones(HIDDEN), zeros(HIDDEN)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(vocabulary),
              "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
              "intermediate_size": INTERMEDIATE, "max_position_embeddings": positions, "type_vocab_size": 2,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
              "layer_norm_eps": 1e-12, "pad_token_id": 0}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                                 "tokenizer_class": "BertTokenizer"}))
    if tokenizer == "vocab.txt":
        (directory / "vocab.txt").write_text("".join(token + "\n" for token in vocabulary), encoding="utf-8")
    else:
        spec = {"normalizer": {"type": "BertNormalizer", "lowercase": True, "strip_accents": None},
                "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                          "vocab": {token: index for index, token in enumerate(vocabulary)}}}
        (directory / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return tensors


@pytest.fixture(scope="module")
def hugging_face_bert(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_bert")
    return directory, write_hugging_face_bert(directory, tiny_csv_vocabulary())


def test_a_hugging_face_checkpoint_is_read_from_vocab_txt_or_tokenizer_json_with_its_weights(hugging_face_bert,
                                                                                           tmp_path):
    import sentiment_analysis as sa

    directory, tensors = hugging_face_bert
    with_vocab = sa.load_bert_checkpoint(str(directory))
    vocabulary = tiny_csv_vocabulary()
    write_hugging_face_bert(tmp_path / "json_only", vocabulary, tokenizer="tokenizer.json")
    assert not (tmp_path / "json_only" / "vocab.txt").exists()
    with_json = sa.load_bert_checkpoint(str(tmp_path / "json_only"))
    for checkpoint in (with_vocab, with_json):
        assert checkpoint.source == "Hugging Face checkpoint directory"
        assert list(checkpoint.vocabulary) == vocabulary
        assert (checkpoint.lowercase, checkpoint.strip_accents) == (True, True)  # strip_accents unset: as lowercase
        assert (checkpoint.positions, checkpoint.layers, checkpoint.hidden_size) == (POSITIONS, LAYERS, HIDDEN)
    # The classifier starts from the file's weights, not from random ones.
    config = sa.TrainConfig(arch="bert", bert_preset=str(directory))
    classifier = sa.build_classifier(config, len(vocabulary), 2)
    backbone = classifier.get_layer("bert_backbone")
    np.testing.assert_array_equal(backbone.token_embedding.get_weights()[0],
                                  tensors["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(backbone.position_embedding.get_weights()[0],
                                  tensors["embeddings.position_embeddings.weight"])
    # The vectorizer is the checkpoint's own tokenizer: lowercased, accents stripped, punctuation split off,
    # HTML tags removed, between [CLS] and [SEP], padded with [PAD].
    import keras_hub
    import tensorflow as tf

    vectorizer = sa.BertVectorizer(with_json.vocabulary, 16, True, True)
    ids = np.asarray(vectorizer(tf.constant([["The FILM, <br />wasn't bad!"]])))[0]
    expected = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True, strip_accents=True)(
        "the film, wasn't bad!")
    assert [vocabulary[i] for i in ids[: np.count_nonzero(ids)]] == (
        ["[CLS]"] + [vocabulary[i] for i in np.asarray(expected)] + ["[SEP]"])
    assert vectorizer.words("The FILM, wasn't bad!") == ["the", "film", ",", "wasn", "'", "t", "bad", "!"]


def test_max_length_is_checked_against_the_position_table_before_any_data_is_read(hugging_face_bert, tmp_path):
    import sentiment_analysis as sa

    directory, _ = hugging_face_bert
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path / "out", "--no-show", "--arch", "bert",
                      "--bert-preset", directory, "--max-length", "100")
    assert_user_error(result, "--max-length 100", f"{POSITIONS} positions", f"--max-length {POSITIONS} or less")
    assert "Read " not in result.stdout  # before the data
    # BERT's default length (256) is cut to the table, and the run says so.
    config = sa.config_from_args(sa.build_train_parser().parse_args(["--arch", "bert", "--bert-preset",
                                                                     str(directory)]))
    assert config.max_length == 256
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert sa.fit_max_length_to_bert(sa.ModelRecipe.of(config)) == POSITIONS
    assert f"texts are cut to {POSITIONS} tokens" in printed.getvalue()


def test_broken_hugging_face_checkpoints_are_one_line(hugging_face_bert, tmp_path):
    directory, _ = hugging_face_bert
    flags = ["--data", TINY_CSV, "--output-dir", tmp_path / "out", *TINY_FLAGS, "--arch", "bert", "--max-length", "32"]
    no_vocabulary = tmp_path / "no_vocabulary"
    write_hugging_face_bert(no_vocabulary, tiny_csv_vocabulary())
    (no_vocabulary / "vocab.txt").unlink()
    assert_user_error(run_main(*flags, "--bert-preset", no_vocabulary), "needs its vocab.txt or tokenizer.json")
    bpe = tmp_path / "bpe"
    write_hugging_face_bert(bpe, tiny_csv_vocabulary(), tokenizer="tokenizer.json")
    spec = json.loads((bpe / "tokenizer.json").read_text())
    spec["model"]["type"] = "BPE"
    (bpe / "tokenizer.json").write_text(json.dumps(spec))
    assert_user_error(run_main(*flags, "--bert-preset", bpe), "not BERT's WordPiece")
    no_cls = tmp_path / "no_cls"
    write_hugging_face_bert(no_cls, [token for token in tiny_csv_vocabulary() if token != "[CLS]"])
    assert_user_error(run_main(*flags, "--bert-preset", no_cls), "lacks [CLS]")
    no_weights = tmp_path / "no_weights"
    write_hugging_face_bert(no_weights, tiny_csv_vocabulary())
    (no_weights / "model.safetensors").write_bytes(b"not a safetensors file")
    result = run_main(*flags, "--bert-preset", no_weights)
    assert_user_error(result, "cannot read model.safetensors")
    assert "Read " not in result.stdout  # before the data


def test_explanation_words_of_two_splits_of_one_text_are_matched_by_their_letters():
    import sentiment_analysis as sa

    standardized = ["i", "didnt", "like", "the", "café", "!"]
    bert = ["i", "didn", "'", "t", "like", "the", "cafe", "!"]
    assert list(sa.word_places(standardized, bert)) == [0, 1, 4, 5, 6, 7]
    # Letters that differ ([UNK]): by relative position.
    assert list(sa.word_places(["a", "b"], ["[UNK]", "x", "y", "z"])) == [0, 2]


@pytest.mark.slow
def test_bert_fine_tunes_from_a_hugging_face_checkpoint_and_predicts_from_its_file(hugging_face_bert, tmp_path):
    import sentiment_analysis as sa

    directory, _ = hugging_face_bert
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, "--no-show", "--epochs", "1", "--max-length",
                      "48", "--arch", "bert", "--bert-preset", directory, "--blend-weight", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"BERT checkpoint {directory} (Hugging Face checkpoint directory): {LAYERS} layers" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    started = metrics["started_from"]
    assert started["bert_checkpoint"] == str(directory) and started["format"] == "Hugging Face checkpoint directory"
    assert (started["positions"], started["layers"], started["vocabulary"]) == (POSITIONS, LAYERS,
                                                                                len(tiny_csv_vocabulary()))
    assert metrics["training"]["word2vec_epochs"] == 0  # BERT starts from its checkpoint, not from Word2Vec
    model = sa.load_model(tmp_path / "model.keras")
    assert sa.model_layers(model)["class_names"].settings["started_from"] == started
    texts = ["A good film, I'd say!", "Bad, bad, bad."]
    predicted = run_main("predict", "--model", tmp_path / "model.keras", *texts)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [line.split("\t") for line in predicted.stdout.splitlines()]
    assert [float(row[1]) for row in rows] == pytest.approx(sa.predict_strings(model, texts)[:, 1], abs=1e-4)
    explained = run_main("predict", "--model", tmp_path / "model.keras", "--explain", texts[0])
    assert explained.returncode == 0, explained.stderr[-3000:]
    lines = [line.split("\t") for line in explained.stdout.splitlines() if line.count("\t") == 1]
    assert [word for word, _ in lines] == ["a", "good", "film", ",", "i", "'", "d", "say", "!"]
    # The blend's baseline terms land on BERT's words: the scores still add up to the blend's change.
    assert any(float(score) != 0 for _, score in lines)
