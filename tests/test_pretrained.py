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
                      "--embeddings must be word2vec, random or an existing word-vector file")
    assert_user_error(run_main(*flags, "--embeddings", TINY_CSV), "is not a word-vector file")
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("the 0.1 0.2 0.3\nfilm 0.4 0.5\n")
    assert_user_error(run_main(*flags, "--embeddings", ragged), "cannot read word vectors")
    assert not (tmp_path / "out" / "metrics.json").exists()
