"""Bad input ends early with one clear line; good variants of columns and labels are understood.

Most bad-input tests call main() in this process; a few run the script in a subprocess, where the promise is
about the process: no traceback, and nothing on stderr but the error (TensorFlow's start-up logs are quiet)."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import sentiment_analysis as sa
from conftest import TINY_CSV, assert_user_error, run_main, run_script, split


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def tiny_rows(count=40):
    return pd.read_csv(TINY_CSV).head(count)


# --- Each bad input: one line on stderr, non-zero exit, no traceback, within seconds, nothing written ---------


BAD_FILES = {
    "empty": ("", "empty"),
    "header_only": ("reviews,sentiment\n", "no rows"),
    "no_text_column": ("title,sentiment\nGreat,positive\nBad,negative\n", "'title'"),
    "no_label_column": ("reviews,stars\nGreat film,5\nBad film,1\n", "'stars'"),
    "class_too_small": ("reviews,sentiment\n" + "".join(f"r{i},{'good' if i % 2 else 'bad'}\n" for i in range(12))
                        + "r12,meh\n", "'meh' (1 rows)"),
    "too_many_classes": ("reviews,sentiment\n" + "".join(f"r{i},class{i}\n" for i in range(101)), "101 label values"),
    "one_label": ("reviews,sentiment\na,positive\nb,positive\nc, Positive \n", "only one label"),
    "too_few_rows": ("reviews,sentiment\na,positive\nb,negative\nc,positive\nd,negative\n", "too few"),
    "not_csv": ('reviews,sentiment\n"unclosed quote,positive\nb,negative\n', "could not parse"),
    # Unquoted commas in every text: pandas would read the first field as an index and shift the columns.
    "more_fields_than_header": ("reviews,sentiment\n" + "".join(f"good, film {i},positive\n" for i in range(12)),
                                "more fields than its header"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_csv_is_refused_before_training(tmp_path, case):
    text, fragment = BAD_FILES[case]
    data = write_csv(tmp_path / f"{case}.csv", text)
    result = run_main("--data", data, "--output-dir", tmp_path / "out", "--no-show")
    assert_user_error(result, fragment)
    assert not any((tmp_path / "out").glob("*")), "nothing is written for a refused input"


@pytest.mark.slow
def test_bad_input_in_a_subprocess_is_one_line_and_nothing_else_unless_a_traceback_is_asked_for(tmp_path):
    """The promise as a user sees it: one line on stderr, no traceback, no TensorFlow start-up logs; with
    SENTIMENT_TRACEBACK=1 the same mistake shows the whole traceback behind the line."""
    data = write_csv(tmp_path / "labels.csv", BAD_FILES["one_label"][0])
    result = run_script("--data", data, "--output-dir", tmp_path / "out")
    assert_user_error(result, "only one label")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.stderr.strip().splitlines() == errors
    full = run_script("--data", data, "--output-dir", tmp_path / "out", env_extra={"SENTIMENT_TRACEBACK": "1"})
    assert full.returncode != 0
    assert "Traceback (most recent call last)" in full.stderr and "UserError" in full.stderr
    assert not any((tmp_path / "out").glob("*")), "nothing is written for a refused input"


def test_missing_file_directory_and_binary_file(tmp_path):
    assert_user_error(run_main("--data", tmp_path / "nope.csv"), "not found")
    assert_user_error(run_main("--data", tmp_path), "directory")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    assert_user_error(run_main("--data", binary), "not a CSV")


def test_listing_of_found_columns_and_labels(tmp_path):
    data = write_csv(tmp_path / "cols.csv", "Title,Score\nx,1\n")
    line = assert_user_error(run_main("--data", data, "--output-dir", tmp_path / "out"))
    assert "'Title'" in line and "'Score'" in line and "--text-column" in line
    rows = "".join(f"t{i},{label}\n" for i, label in enumerate(["x"] * 10 + ["y"] * 10 + ["z", "w", "w"]))
    data = write_csv(tmp_path / "labels.csv", "text,label\n" + rows)
    line = assert_user_error(run_main("--data", data, "--output-dir", tmp_path / "out"))
    assert "'z' (1 rows)" in line and "'w' (2 rows)" in line and "'x'" not in line


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert_user_error(run_main("--data", TINY_CSV, "--output-dir", blocker), "is a file")
    assert_user_error(run_main("--data", TINY_CSV, "--output-dir", blocker / "sub"), "cannot write")


@pytest.mark.parametrize("flags, fragment", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--vocab-size", "2"], "--vocab-size"),
    (["--test-fraction", "1.5"], "--test-fraction"),
    (["--spatial-dropout", "1"], "--spatial-dropout"),
    (["--blend-weight", "0.5", "--no-baseline"], "needs the baseline"),
    (["--blend-weight", "1.5"], "--blend-weight must be in [0, 1] or auto (got 1.5)"),
    (["--learning-rate", "0"], "--learning-rate must be positive (got 0.0)"),
    (["--cpu-replicas", "0"], "--cpu-replicas must be at least 1 (got 0)"),
])
def test_nonsense_flag_values(tmp_path, flags, fragment):
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, *flags)
    assert_user_error(result, fragment)
    assert not any(tmp_path.glob("*"))


def test_unknown_flag_and_bad_choice_exit_with_usage():
    for flags in (["--epoch", "1"], ["--arch", "transformer"], ["--epochs", "many"]):
        result = run_main(*flags)
        assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_help_lists_the_options_and_prints_nothing_else():
    result = run_script("--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    for flag in ("--data", "--epochs", "--arch", "--embeddings", "--preset", "--no-baseline", "--no-show"):
        assert flag in result.stdout
    assert "--cpu-replicas" not in result.stdout, "a flag for the tests, hidden from users"


def test_hidden_cpu_replicas_flag_still_parses():
    config = sa.config_from_args(sa.build_train_parser().parse_args(["--cpu-replicas", "2"]))
    assert config.cpu_replicas == 2


def test_a_config_field_of_unknown_type_stops_the_flag_builder():
    import argparse
    import dataclasses

    @dataclasses.dataclass
    class Odd:
        sizes: list[int] = sa.option(None, "a field the flag builder cannot parse")

    with pytest.raises(TypeError, match="sizes"):
        sa.add_config_flags(argparse.ArgumentParser(), Odd)
    sa.add_config_flags(argparse.ArgumentParser(argument_default=argparse.SUPPRESS), sa.TrainConfig)


def test_every_field_of_the_config_has_a_flag_parser():
    for spec in dataclasses.fields(sa.TrainConfig):
        assert spec.type == "bool" or spec.type in sa.FLAG_PARSERS, spec.name


# --- The pieces, in process -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    (["positive", "negative"], [1, 0]),
    ([" Positive ", "NEGATIVE"], [1, 0]),
    (["pos", "neg"], [1, 0]),
    (["1", "0"], [1, 0]),
    (["True", "false "], [1, 0]),
    (["1.0", "0.0"], [1, 0]),
])
def test_label_variants(raw, expected):
    encoded, classes = sa.encode_labels(pd.Series(raw * 2))
    assert encoded.tolist() == expected * 2
    assert classes.names == ("negative", "positive")


def test_columns_found_case_insensitively_or_by_flag():
    assert sa.find_column(["Review", "Sentiment"], sa.TEXT_COLUMN_NAMES, None, "text", "--x") == "Review"
    assert sa.find_column(["TEXT", "label"], sa.TEXT_COLUMN_NAMES, None, "text", "--x") == "TEXT"
    assert sa.find_column(["body", "y"], sa.TEXT_COLUMN_NAMES, "Body", "text", "--x") == "body"
    with pytest.raises(sa.UserError, match="'body'"):
        sa.find_column(["body", "y"], sa.TEXT_COLUMN_NAMES, None, "text", "--text-column")


def test_column_overrides_end_to_end_reach_the_data(tmp_path):
    rows = tiny_rows().rename(columns={"reviews": "body", "sentiment": "y"})
    rows["y"] = rows["y"].map({"positive": "POS", "negative": "neg"})
    data = tmp_path / "renamed.csv"
    rows.to_csv(data, index=False)
    config = sa.TrainConfig(data=str(data), text_column="body", label_column="y")
    data = sa.load_dataset(config)
    assert len(data.labels) == len(rows) == data.rows_read
    assert data.labels.tolist() == (rows["y"] == "POS").astype(int).tolist()


def test_drops_are_counted(tmp_path):
    rows = tiny_rows(20)
    extra = pd.DataFrame({"reviews": ["", "   ", "fine text", rows["reviews"][0], rows["reviews"][1]],
                          "sentiment": ["positive", "negative", "", "positive", rows["sentiment"][1]]})
    data = tmp_path / "messy.csv"
    pd.concat([rows, extra]).to_csv(data, index=False)
    loaded = sa.load_dataset(sa.TrainConfig(data=str(data)))
    # A text without a label is unlabelled text, kept apart, not dropped.
    assert loaded.dropped == {"missing_text": 2, "duplicate_text": 2}
    assert loaded.unlabelled.tolist() == ["fine text"]
    assert loaded.rows_read == 25 and len(loaded.texts) == len(loaded.labels) == 20
    assert len(set(loaded.texts)) == len(loaded.texts)


def test_latin1_file_is_read_with_a_warning(tmp_path, capsys):
    rows = tiny_rows(20)
    rows.loc[0, "reviews"] = "Un film très réussi, vraiment café"
    data = tmp_path / "latin1.csv"
    rows.to_csv(data, index=False, encoding="latin-1")
    loaded = sa.load_dataset(sa.TrainConfig(data=str(data)))
    assert "très réussi" in loaded.texts[0]
    assert "Latin-1" in capsys.readouterr().err


def test_texts_hold_utf8_bytes_and_give_strings_as_an_object_array_would():
    strings = ["première", "", "two words", "日本語のテキスト", "last"]
    texts, array = sa.Texts.of(strings), np.array(strings, dtype=object)
    assert len(texts) == 5 and texts[3] == strings[3] and list(texts) == strings
    for index in (slice(1, 4), slice(None), np.array([4, 0, 0]), array != ""):
        assert texts[index].dtype == object and texts[index].tolist() == array[index].tolist()
    part = texts.take(np.array([3, 1]))
    assert part.tolist() == ["日本語のテキスト", ""] and part.data is texts.data  # a view, not a copy
    assert np.concatenate([texts, array]).tolist() == strings * 2
    chained = sa.ChainedTexts(part, array[:2], np.array([], dtype=object))
    assert len(chained) == 4 and chained[1:3].tolist() == ["", "première"] and chained[3:9].tolist() == [""]


def test_the_vocabulary_is_learned_from_a_seeded_sample_of_many_texts(monkeypatch, capsys):
    monkeypatch.setattr(sa, "VOCABULARY_TEXTS", 5)
    train = sa.Texts.of([f"train {i}" for i in range(6)])
    unlabelled = np.array([f"more {i}" for i in range(4)], dtype=object)
    sample = sa.vocabulary_texts(train, unlabelled, 3)[0:5].tolist()
    assert len(set(sample)) == 5 and set(sample) <= set(train.tolist()) | set(unlabelled)
    assert sample == sorted(sample, key=(train.tolist() + unlabelled.tolist()).index)  # in their order
    assert sa.vocabulary_texts(train, unlabelled, 3)[0:5].tolist() == sample  # the seed's sample, every time
    assert "a sample of 5 of the 10 texts" in capsys.readouterr().out
    monkeypatch.setattr(sa, "VOCABULARY_TEXTS", 10)
    assert sa.vocabulary_texts(train, unlabelled, 3)[0:10].tolist() == train.tolist() + unlabelled.tolist()


def test_a_file_found_not_utf8_after_its_first_chunks_is_read_again_whole(tmp_path, capsys, monkeypatch):
    """Pass one streams chunks into the text store: a Latin-1 byte in a late chunk rewinds the store and the
    counts to the file's start, so each row is there once, decoded as Latin-1, after the rows of the file before."""
    monkeypatch.setattr(sa, "READ_CHUNK_ROWS", 500)
    rows = pd.DataFrame({"reviews": [f"review {i}: " + "a fine long film " * 12 for i in range(6000)],
                         "sentiment": ["positive", "negative"] * 3000})
    rows.loc[5900, "reviews"] = "Un film très réussi, vraiment café"  # past pandas' first 256 KB read of b.csv
    rows.iloc[:1000].to_csv(tmp_path / "a.csv", index=False)
    rows.iloc[1000:].to_csv(tmp_path / "b.csv", index=False, encoding="latin-1")
    store, real_add, chunks = tmp_path / "texts.utf8", sa.RowsRead.add, []
    monkeypatch.setattr(sa.RowsRead, "add", lambda rows, chunk, texts: (chunks.append(len(chunk)),
                                                                        real_add(rows, chunk, texts)))
    loaded = sa.load_dataset(sa.TrainConfig(data=str(tmp_path / "*.csv")), store)
    assert "Latin-1" in capsys.readouterr().err
    assert len(chunks) > 2 + 10  # a.csv's 2 chunks, some of b.csv's as UTF-8, then its 10 as Latin-1
    assert loaded.rows_read == 6000 and loaded.texts.tolist() == rows["reviews"].tolist()
    assert store.stat().st_size == sum(len(text.encode("utf-8")) for text in rows["reviews"])
    in_memory = sa.load_dataset(sa.TrainConfig(data=str(tmp_path / "*.csv")))
    assert in_memory.texts.tolist() == loaded.texts.tolist() and (in_memory.labels == loaded.labels).all()
    assert isinstance(loaded.texts.data, sa.FileArray)  # read back from the file when used, not held


def test_duplicates_are_found_across_chunks_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sa, "READ_CHUNK_ROWS", 3)
    rows = tiny_rows(20)
    again = rows.iloc[[2, 5]].copy()
    again.loc[:, "sentiment"] = ""  # the same texts without a label: unlabelled, not duplicates
    pd.concat([rows.iloc[:10], again]).to_csv(tmp_path / "a.csv", index=False)
    pd.concat([rows.iloc[[1, 7]], rows.iloc[10:]]).to_csv(tmp_path / "b.csv", index=False)
    loaded = sa.load_dataset(sa.TrainConfig(data=str(tmp_path)), tmp_path / "texts.utf8")
    assert loaded.dropped == {"missing_text": 0, "duplicate_text": 2} and loaded.rows_read == 24
    assert loaded.texts.tolist() == rows["reviews"].tolist()  # the first of each kept, in the files' order
    assert loaded.unlabelled.tolist() == rows["reviews"].iloc[[2, 5]].tolist()


def test_split_is_stratified_and_repeatable():
    data = sa.LoadedData(np.array([f"review {i}" for i in range(200)], dtype=object), np.array([0, 1] * 100))
    config = sa.TrainConfig(seed=3)
    first, second = split(data, config), split(data, config)
    for name in ("train", "validation", "test"):
        assert getattr(first, name).texts.tolist() == getattr(second, name).texts.tolist()
    assert len(first.test.labels) == 40 and first.test.labels.sum() == 20
    all_texts = np.concatenate([first.train.texts, first.validation.texts, first.test.texts])
    assert len(set(all_texts)) == 200
    other = sa.split_dataset(data, 0.2, 0.1, 4)
    assert other.test.texts.tolist() != first.test.texts.tolist()


def test_a_row_splits_by_its_text_not_by_the_order_or_the_files(tmp_path, monkeypatch):
    """The split is a keyed hash of each text within its class: a CSV read in several chunks splits the same
    (the same rows, in the same order) as its rows shuffled, or cut into shards of a directory; another seed
    splits otherwise; each class's shares are exact to a row."""
    monkeypatch.setattr(sa, "READ_CHUNK_ROWS", 7)
    rows = pd.read_csv(TINY_CSV)
    shuffled, shards = tmp_path / "shuffled.csv", tmp_path / "shards"
    rows.sample(frac=1, random_state=1).to_csv(shuffled, index=False)
    shards.mkdir()
    mixed = rows.sample(frac=1, random_state=2)
    for number, start in enumerate(range(0, len(mixed), 70)):
        mixed.iloc[start:start + 70].to_csv(shards / f"part-{number}.csv", index=False)
    config = sa.TrainConfig(data=str(TINY_CSV))
    splits = [split(sa.load_dataset(sa.TrainConfig(data=str(data))), config) for data in (TINY_CSV, shuffled, shards)]
    for name in ("train", "validation", "test"):
        texts = [getattr(each, name).texts.tolist() for each in splits]
        assert texts[0] == texts[1] == texts[2] and texts[0]
        labels = getattr(splits[0], name).labels
        assert [getattr(each, name).labels.tolist() for each in splits[1:]] == [labels.tolist()] * 2
    counts = np.bincount(sa.load_dataset(config).labels)
    for index, count in enumerate(counts):
        test, validation = sa.split_shares(count, config.test_fraction, config.validation_fraction)
        assert (np.sum(splits[0].test.labels == index), np.sum(splits[0].validation.labels == index)) == (test,
                                                                                                      validation)
    other = split(sa.load_dataset(config), sa.TrainConfig(seed=7))
    assert set(other.test.texts) != set(splits[0].test.texts)


def test_preset_values_yield_to_explicit_flags():
    args = sa.build_train_parser().parse_args(["--preset", "best", "--epochs", "7"])
    config = sa.config_from_args(args)
    assert config.epochs == 7
    for key, value in sa.PRESETS["best"].items():
        if key != "epochs":
            assert getattr(config, key) == value
    assert sa.config_from_args(sa.build_train_parser().parse_args([])) == sa.TrainConfig()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "report.txt"
    with pytest.raises(RuntimeError):
        with sa._atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    sa._write_text(target, "whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


@pytest.mark.slow
def test_tensorflow_start_up_logs_are_quiet_unless_asked_for():
    code = "import os, sentiment_analysis; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=sa.SCRIPT_DIR, env=env)
    assert quiet.stdout.split() == ["3"] and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=sa.SCRIPT_DIR,
                          env={**env, "SENTIMENT_TF_LOGS": "1"})
    assert loud.stdout.split() == ["None"], loud.stderr  # TensorFlow's own defaults: it logs as it always does


def test_max_rows_reads_only_the_first_rows():
    loaded = sa.load_dataset(sa.TrainConfig(data=str(TINY_CSV), max_rows=50))
    assert loaded.rows_read == 50
    assert loaded.texts.tolist() == pd.read_csv(TINY_CSV)["reviews"].head(50).tolist()


def test_reading_a_large_csv_shows_how_far_it_has_come(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sa.StageProgress, "LOG_EVERY", 0.0)  # a line at every check, not every minute
    monkeypatch.setattr(sa, "READ_CHUNK_ROWS", 4000)
    rows = pd.DataFrame({"reviews": [f"review number {index} " + "word " * 50 for index in range(12_000)],
                         "sentiment": ["positive", "negative"] * 6000})
    data = tmp_path / "large.csv"
    rows.to_csv(data, index=False)
    assert data.stat().st_size > 3 * 2**20
    loaded = sa.load_dataset(sa.TrainConfig(data=str(data)))
    lines = [line for line in capsys.readouterr().out.splitlines() if "reading: " in line]
    assert len(lines) == 2 and all(line.startswith("  reading: ") and "/3 MB" in line for line in lines), lines
    done = [int(line.split("reading: ")[1].split("/")[0]) for line in lines]
    assert done == sorted(done) and done[0] > 0
    assert loaded.rows_read == 12_000 and loaded.texts.tolist() == rows["reviews"].tolist()
    assert loaded.labels.tolist() == [1, 0] * 6000


def chinese_reviews(path, rows=120):
    """Made-up Chinese reviews without spaces: the sentiment is in a few two-character words among filler."""
    rng = np.random.default_rng(0)
    words = {"positive": ["好看", "精彩", "喜欢", "推荐"], "negative": ["难看", "无聊", "失望", "浪费"]}
    filler = list("这部电影的故事情节演员表演导演音乐画面节奏结局我们觉得非常有点真是一个还是")
    texts, labels = [], []
    for index in range(rows):
        label = ("negative", "positive")[index % 2]
        parts = [str(rng.choice(filler)) for _ in range(int(rng.integers(6, 14)))]
        for word in rng.choice(words[label], 2):
            parts.insert(int(rng.integers(0, len(parts) + 1)), str(word))
        texts.append("".join(parts) + "。")
        labels.append(label)
    pd.DataFrame({"review": texts, "sentiment": labels}).to_csv(path, index=False)
    return path


def test_text_without_spaces_is_refused_before_training_with_what_to_do(tmp_path):
    data = chinese_reviews(tmp_path / "chinese.csv")
    result = run_main("--data", data, "--output-dir", tmp_path / "out", "--epochs", "1", "--no-show")
    assert_user_error(result, "training texts are one or two tokens", "without spaces", "--tokenizer wordpiece")
    assert "Epoch 1" not in result.stdout and not (tmp_path / "out" / "model.keras").exists()


@pytest.mark.slow
def test_wordpiece_splits_text_without_spaces_and_the_baseline_steps_aside(tmp_path):
    import json

    data = chinese_reviews(tmp_path / "chinese.csv")
    result = run_main("--data", data, "--output-dir", tmp_path / "out", "--tokenizer", "wordpiece",
                      "--vocab-size", "500", "--max-length", "40", "--epochs", "2", "--no-show")
    assert result.returncode == 0, result.stderr[-3000:]
    # Whitespace words give the TF-IDF baseline no word shared by two texts: it is left out, with a warning.
    assert "warning: the baseline cannot be fitted on these texts" in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "baseline" not in metrics and metrics["training"]["epochs_run"] == 2
    # WordPiece splits the Chinese characters: every text is several tokens long.
    import sentiment_analysis

    model = sentiment_analysis.load_model(tmp_path / "out" / "model.keras")
    vectorizer = model.get_layer("vectorizer")
    texts = pd.read_csv(data)["review"].head(20).tolist()
    ids = sentiment_analysis.vectorize(vectorizer, texts, 40)
    assert (ids.lengths >= 6).all() and sentiment_analysis.unsplit_texts(ids) == 0
    # Asked for a blend, the run cannot go on without the baseline: one line.
    result = run_main("--data", data, "--output-dir", tmp_path / "blend", "--tokenizer", "wordpiece",
                      "--vocab-size", "500", "--max-length", "40", "--epochs", "1", "--no-show", "--preset", "best")
    assert_user_error(result, "baseline cannot be fitted", "nothing to blend")


@pytest.mark.slow
def test_the_run_says_in_plain_words_where_it_trains(tmp_path):
    import os

    flags = ("--data", TINY_CSV, "--epochs", "1", "--vocab-size", "500", "--max-length", "40", "--no-baseline",
             "--no-show")
    # A process of its own, whose TensorFlow has not started: one thread per op for the recurrent models
    # (Architecture.op_threads: their steps are many small ops), unless the environment asks for others.
    result = run_script(*flags, "--output-dir", tmp_path / "own")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Training on the CPU, {os.cpu_count()} cores, 1 thread per op; TensorFlow" in result.stdout
    assert "_DefaultDistributionStrategy" not in result.stdout
    asked = run_script(*flags, "--output-dir", tmp_path / "asked", env_extra={"TF_NUM_INTRAOP_THREADS": "2"})
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert f"Training on the CPU, {os.cpu_count()} cores; TensorFlow" in asked.stdout


# --- --data as a directory or a glob of shards ------------------------------------------------------------


def write_shards(directory, rows, parts=3):
    """rows cut into `parts` files of the same columns, the second one a TSV, named in the rows' order."""
    directory.mkdir(exist_ok=True)
    for index, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
        tsv = index == 1
        rows.iloc[chunk].to_csv(directory / f"reviews-{index}.{'tsv' if tsv else 'csv'}", index=False,
                                sep="\t" if tsv else ",")
    return directory


def test_a_directory_or_a_glob_of_shards_reads_as_one_table_in_name_order(tmp_path):
    rows = tiny_rows(60)
    shards = write_shards(tmp_path / "shards", rows)
    (shards / "notes.md").write_text("not data")  # neither .csv nor .tsv: not read
    whole = sa.load_dataset(sa.TrainConfig(data=str(TINY_CSV), max_rows=60))
    from_directory = sa.load_dataset(sa.TrainConfig(data=str(shards)))
    assert from_directory.texts.tolist() == whole.texts.tolist() == rows["reviews"].tolist()
    assert from_directory.labels.tolist() == whole.labels.tolist() and from_directory.rows_read == 60
    from_glob = sa.load_dataset(sa.TrainConfig(data=str(shards / "reviews-*.csv")))  # the TSV is left out
    assert from_glob.texts.tolist() == rows["reviews"].iloc[np.r_[0:20, 40:60]].tolist()
    first = sa.load_dataset(sa.TrainConfig(data=str(shards), max_rows=25))  # the first rows across the files
    assert first.rows_read == 25 and first.texts.tolist() == rows["reviews"].head(25).tolist()


def test_shards_with_other_columns_no_match_or_an_empty_directory_are_one_line(tmp_path):
    shards = write_shards(tmp_path / "shards", tiny_rows(60))
    tiny_rows(20).rename(columns={"sentiment": "label"}).to_csv(shards / "reviews-3.csv", index=False)
    line = assert_user_error(run_main("--data", shards, "--output-dir", tmp_path / "out"), "same columns")
    assert "reviews-3.csv" in line and "'label'" in line
    assert_user_error(run_main("--data", tmp_path / "shards" / "nothing-*.csv"), "no file matches")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_main("--data", tmp_path / "empty"), "no .csv or .tsv file in the directory")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*"))
