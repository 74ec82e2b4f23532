"""Train an LSTM sentiment classifier on the IMDB reviews, report honest metrics, and use it on new text.

Run it:
    python sentiment_analysis.py                          # train the default model on imdb.csv
    python sentiment_analysis.py --epochs 1 --max-rows 5000 --no-show    # a quick look on a laptop
    python sentiment_analysis.py --preset best            # the strongest recipe measured (see README)
    python sentiment_analysis.py predict "A wonderful film." "Two hours I will never get back."
    python sentiment_analysis.py predict --input my_reviews.csv --output predictions.csv
    python sentiment_analysis.py predict --explain "Great cast, dull plot."    # each word's push
    python sentiment_analysis.py --data tweets.tsv --label-column airline_sentiment   # your own labels
    TF_CONFIG='{"cluster": ...}' python sentiment_analysis.py    # one worker of a cluster (see the README)

The default model is the design card's: Embedding(vocab, 128) -> SpatialDropout1D(0.2) -> LSTM(100) ->
Dense(1, sigmoid), its embedding started from Word2Vec vectors trained on the training split. How long it
trains is planned from the size of the data (plan_training): 4 epochs of batches of 128 on the full IMDB data,
more epochs of smaller batches (and more Word2Vec passes) on a few thousand rows; flags given win. Everything else
(other architectures, random embeddings, the blend with the TF-IDF baseline) is an option on top of it. Labels
of other names train the same model; three or more classes end in Dense(classes, softmax).
Pretrained knowledge comes in as options: --embeddings FILE (GloVe, word2vec, fastText vectors),
--tokenizer wordpiece (subword pieces) and --arch bert (a KerasHub preset or a Hugging Face BERT checkpoint,
fine-tuned).
Outputs land in --output-dir (default outputs/): model.keras (takes raw strings), saved_model/1/ (the same
for TensorFlow Serving), metrics.json, classification_report.txt, history.csv, errors.csv, three figures,
report.html (all of it on one page, with what to trust: the baseline's validation figures beside the model's and
its learning curve) and tensorboard/ (the training curves). A run holds OUTPUT_DIR/.run.lock, so a second run
into the same directory is refused; SIGTERM saves the training state after the current step (exit 143), and
the same command resumes.

How to read this file: it runs from the bottom up. Each section defines what the sections below it use, in
the order a run needs it (a test checks it). The sections, in order: configuration -> operations (private
helpers) -> data -> functions inside the model file -> the script's Keras layers -> text to tokens -> the
training plan -> model -> baseline and blend -> noise -> devices -> the training loop -> learning from unlabelled
text -> evaluation -> figures -> explanations -> the HTML report -> before a run -> the stages of a run (Run,
TeacherStage, LabelledStage, DistilledStage, choose_stages) -> the training run (`run_training`, the story of a
run) -> prediction -> command line (`main`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import functools
import glob
import gzip
import hashlib
import html
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import unicodedata
import webbrowser
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import safetensors

# TensorFlow's C++ start-up messages (CUDA probing on machines without a GPU, oneDNN, CPU features) are not for
# users. TF_CPP_MIN_LOG_LEVEL=3 hides those logged once TensorFlow runs; the lines it prints while it loads,
# before its logging is set up, ignore that variable (tensorflow/tensorflow#100442), so they go to a file that is
# shown only if the import fails. SENTIMENT_TF_LOGS=1 shows everything.
TF_LOGS = os.environ.get("SENTIMENT_TF_LOGS", "") not in ("", "0")
if not TF_LOGS:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_saved_stderr = None
if not TF_LOGS and "tensorflow" not in sys.modules:
    sys.stderr.flush()
    _start_up_log, _saved_stderr = tempfile.TemporaryFile(), os.dup(2)
    os.dup2(_start_up_log.fileno(), 2)
try:
    import keras
    import keras_hub
    import tensorflow as tf
    from keras import layers
except BaseException:
    if _saved_stderr is not None:
        os.dup2(_saved_stderr, 2)
        _start_up_log.seek(0)
        sys.stderr.write(_start_up_log.read().decode("utf-8", "replace"))
        _saved_stderr = None
    raise
finally:
    if _saved_stderr is not None:
        os.dup2(_saved_stderr, 2)
        os.close(_saved_stderr)
        _start_up_log.close()
import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns
import gensim.downloader
import joblib
from threadpoolctl import threadpool_limits
from gensim.models import KeyedVectors, Word2Vec
from sklearn import metrics
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.metrics import log_loss, roc_auc_score, roc_curve

SCRIPT_DIR = Path(__file__).resolve().parent
TEXT_COLUMN_NAMES = ("reviews", "review", "text")
LABEL_COLUMN_NAMES = ("sentiment", "label")
POSITIVE_LABELS = {"positive", "pos", "1", "1.0", "true"}
NEGATIVE_LABELS = {"negative", "neg", "0", "0.0", "false"}
CLASS_NAMES = ("negative", "positive")  # the classes of positive/negative-style labels, and of older model files
MIN_ROWS = 10
READ_CHUNK_ROWS = 50_000  # rows of --data parsed at a time, between progress checks
EMBEDDING_METHODS = ("word2vec", "random")  # else --embeddings names a word-vector file
DEFAULT_EMBEDDING_DIM = 128
MAX_CLASSES = 100
MIN_CLASS_ROWS = 3  # one for each of the training, validation and test splits
SMALL_CLASS_SHARE = 0.2  # a smaller class than this share of the rows is pointed out
# With two classes, a review gets the positive class when that class's probability is at least this
# (predict --threshold aside); with more, it gets the most probable class.
DECISION_THRESHOLD = 0.5


# ----------------------------------------------------------------------------------------------------------
# Configuration: one dataclass; each field's help text becomes its flag's --help line
# ----------------------------------------------------------------------------------------------------------


def option(default, help_text, shapes_training=True, hidden=False, **argparse_kwargs):
    """A config field. `shapes_training=False` marks a setting that a crashed run may change when it resumes
    (where outputs go, what is reported; the baseline's flags too, unless the baseline teaches: then the
    fingerprint's TARGETS holds them); `hidden` keeps the flag out of --help."""
    metadata = {"help": help_text, "shapes_training": shapes_training, "hidden": hidden, **argparse_kwargs}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # Not part of the training fingerprint by name: a digest of the data's bytes is (a moved file still resumes).
    data: str = option(str(SCRIPT_DIR / "imdb.csv"), "CSV (or TSV) file with a review text column and a label "
                       "column; or a directory of such files, or a glob of them in quotes ('reviews-*.csv'), "
                       "read in name order as one table", shapes_training=False)
    text_column: str | None = option(None, "name of the text column (default: reviews, review or text)")
    label_column: str | None = option(None, "name of the label column (default: sentiment or label)")
    sep: str | None = option(None, "column separator of --data: a character, or tab (default: tab for .tsv "
                             "files, else a comma)")
    positive_label: str | None = option(None, "with two label values: the one that precision, recall, F1 and "
                                        "the ROC curve are about (default: positive for positive/negative-style "
                                        "labels, else the less frequent class)")
    output_dir: str = option("outputs", "directory for the model, metrics, reports and figures",
                             shapes_training=False)
    max_rows: int | None = option(None, "read only the first N rows of the CSV (quick runs)")
    unlabelled: str | None = option(None, "more text without labels, for --semi-supervised: a CSV or TSV file (its "
                                    "text column found as for --data, or --text-column) or a .txt file with one "
                                    "text per line; rows of --data with a text and an empty label count as such "
                                    "text too", shapes_training=False)  # its bytes are in the data digest
    semi_supervised: str = option("auto", "how unlabelled text is used: teacher trains the model first on the "
                                  "baseline's probabilities for the unlabelled texts (its vocabulary and Word2Vec "
                                  "learned on them too), then on the labels (with no unlabelled text: the "
                                  "baseline's out-of-fold probabilities on the training split, beside the labels); "
                                  "none ignores unlabelled text; auto chooses teacher when there are unlabelled "
                                  "texts, at least as many as training rows, and a baseline, and else distils for "
                                  "the lstm from 10,000 training rows with a baseline (README: Unlabelled text)",
                                  choices=("auto", "none", "teacher"))
    pretrain_epochs: int | None = option(None, "epochs of the teacher stage, "
                                         "early stopping aside (default: planned from the number of texts)")
    seed: int = option(42, "seed for the split, the weights and the data order")
    test_fraction: float = option(0.2, "share of the rows held out for the final test")
    validation_fraction: float = option(0.1, "share of the training rows used for early stopping")
    vocab_size: int = option(30000, "number of distinct words kept, including padding and [UNK]")
    max_length: int = option(500, "tokens kept from the start of each review")
    embedding_dim: int | None = option(None, "size of the word vectors (default: 128, or the size of the "
                                       "vectors in an --embeddings file)")
    spatial_dropout: float = option(0.2, "SpatialDropout1D rate after the embedding")
    arch: str = option("lstm", "the model: a recurrent layer type, or bert to fine-tune a pretrained KerasHub "
                       "BERT (see --bert-preset; it brings its own defaults for --learning-rate, --batch-size, "
                       "--epochs and --max-length)", choices=("lstm", "bilstm", "gru", "bert"))
    bert_preset: str = option("bert_tiny_en_uncased", "with --arch bert: a KerasHub BERT preset name (downloaded "
                              "by KerasHub on first use), a local KerasHub preset directory, or a Hugging Face "
                              "BERT checkpoint directory (config.json, model.safetensors, vocab.txt or "
                              "tokenizer.json)")
    units: int = option(100, "units in each recurrent layer")
    layers: int = option(1, "number of stacked recurrent layers")
    tokenizer: str = option("word", "word: whole words (Keras TextVectorization); wordpiece: WordPiece subword "
                            "pieces learned on the training split (KerasHub), --vocab-size of them",
                            choices=("word", "wordpiece"))
    embeddings: str = option("word2vec", "embedding initialisation: word2vec trains gensim Word2Vec on the "
                             "training split (more passes on small data; README: Small data); random starts from "
                             "random vectors; or a word-vector file to start from (GloVe text, word2vec text or "
                             "binary, fastText .vec), or a name of gensim's downloader such as "
                             "glove-wiki-gigaword-100")
    epochs: int | None = option(None, "number of training epochs, early stopping aside (default: planned from the "
                                "data size, at least --min-epochs; README: Small data)")
    min_epochs: int = option(4, "with the planned --epochs: the fewest epochs planned, on any data size")
    batch_size: int | None = option(None, "examples per batch, per device when several are used (default: 128, "
                                    "or 32 on a small training split; README: Small data)")
    learning_rate: float = option(2e-3, "initial Adam learning rate")
    lr_schedule: str = option("cosine", "learning-rate schedule: constant, or cosine decay to zero over the "
                              "planned steps (the epochs times the batches of an epoch)",
                              choices=("constant", "cosine"))
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW) when above zero")
    patience: int | None = option(None, "epochs without validation-loss improvement before stopping (default: "
                                  "1, or more when epochs are short; README: Small data)")
    class_weight: str = option("none", "balanced weights each review's loss by the inverse frequency of its "
                               "class in the training split (and the baseline likewise)",
                               choices=("none", "balanced"))
    baseline: bool = option(True, "also fit the TF-IDF + logistic-regression baseline on the same split",
                            shapes_training=False)
    baseline_ngrams: int = option(2, "longest word n-gram in the baseline's TF-IDF features",
                                  shapes_training=False)
    baseline_rows: int = option(100_000, "the baseline, its learning curve and the teacher's folds fit on at most "
                                "this many training texts (a seeded, stratified sample; the rest are scored in "
                                "chunks), so their memory and time stay bounded on large data",
                                shapes_training=False)
    blend_weight: float | str | None = option(None, "W in [0, 1] or auto (chosen on the validation split): also "
                                              "report W * neural + (1 - W) * baseline and save that blend as "
                                              "the model", shapes_training=False)
    show: bool = option(True, "show the figures in windows when a display is available", shapes_training=False)
    fresh: bool = option(False, "ignore a saved training state in the output directory and start over",
                         shapes_training=False)
    mixed_precision: bool = option(False, "use mixed float16 precision on GPUs (ignored on CPUs)")
    cpu_replicas: int = option(1, "split the CPU into N logical devices and mirror the model across them "
                               "(tests the multi-device path without GPUs)", hidden=True)


# The strongest recipe measured on the shipped data, chosen by validation accuracy (figures in the README):
# the default LSTM planned for at least 6 epochs (on all of imdb.csv auto distils, and soft targets get 1.5x
# that: 9), blended with the TF-IDF baseline at a weight chosen on validation data. Flags given on the command
# line still override these values.
PRESETS = {
    "best": dict(min_epochs=6, blend_weight="auto"),
}

# Fine-tuning defaults of --arch bert, where the card's LSTM settings do not fit: Adam at 5e-5, batch size 32
# and 3 epochs, from the ranges the BERT paper recommends for fine-tuning (Devlin et al., 2019, appendix A.3:
# 5e-5, 3e-5 or 2e-5; 16 or 32; 2 to 4 epochs) and the learning rate of KerasHub's classification guide;
# 256 tokens, half of BERT's 512, which covers the median IMDB review whole at a quarter of the attention
# cost. The embedding and the tokenizer are the preset's. Flags given on the command line override these.
BERT_DEFAULTS = dict(learning_rate=5e-5, batch_size=32, epochs=3, max_length=256, embeddings="random",
                     tokenizer="wordpiece")


class UserError(Exception):
    """A mistake in the user's input or flags: reported as one line on stderr, never as a traceback."""


class Terminated(Exception):
    """SIGTERM stopped training after a step, its state saved: said on stderr, exit status 143 (128 + 15)."""


class Interrupted(Terminated):
    """Ctrl-C stopped a stage that leaves nothing to evaluate, its state saved: exit status 130 (128 + 2)."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def is_downloader_name(value: str) -> bool:
    """A name of gensim's downloader such as glove-wiki-gigaword-100 (lower-case words and numbers joined by
    hyphens), as opposed to a path."""
    return re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", value) is not None


def validate_config(config: TrainConfig, architecture) -> None:
    """Refuse nonsensical flag values before any work (`architecture`: the --arch record, ARCHITECTURES). Each
    rule names the field it checks."""
    checkpoint = architecture.checkpoint is not None  # it starts from pretrained weights, not word vectors
    rules = [
        ("epochs", config.epochs is None or config.epochs >= 1, "must be at least 1"),
        ("min_epochs", config.min_epochs >= 1, "must be at least 1"),
        ("batch_size", config.batch_size is None or config.batch_size >= 1, "must be at least 1"),
        ("vocab_size", config.vocab_size >= 3, "must be at least 3 (padding, [UNK] and one word)"),
        ("max_length", config.max_length >= 1, "must be at least 1"),
        ("embedding_dim", config.embedding_dim is None or config.embedding_dim >= 1, "must be at least 1"),
        ("embeddings", config.embeddings in EMBEDDING_METHODS or Path(config.embeddings).is_file()
         or is_downloader_name(config.embeddings),
         "must be word2vec, random, an existing word-vector file or a name of gensim's downloader"),
        ("units", config.units >= 1, "must be at least 1"),
        ("layers", config.layers >= 1, "must be at least 1"),
        ("patience", config.patience is None or config.patience >= 1, "must be at least 1"),
        ("learning_rate", config.learning_rate > 0, "must be positive"),
        ("weight_decay", config.weight_decay >= 0, "must be 0 or more"),
        ("spatial_dropout", 0 <= config.spatial_dropout < 1, "must be in [0, 1)"),
        ("test_fraction", 0 < config.test_fraction < 1, "must be between 0 and 1"),
        ("validation_fraction", 0 < config.validation_fraction < 1, "must be between 0 and 1"),
        ("max_rows", config.max_rows is None or config.max_rows >= 1, "must be at least 1"),
        ("blend_weight", config.blend_weight in (None, "auto") or 0 <= config.blend_weight <= 1,
         "must be in [0, 1] or auto"),
        ("baseline_ngrams", config.baseline_ngrams >= 1, "must be at least 1"),
        ("baseline_rows", config.baseline_rows >= MIN_ROWS, f"must be at least {MIN_ROWS}"),
        ("blend_weight", config.blend_weight is None or config.baseline,
         "needs the baseline (drop --no-baseline)"),
        ("cpu_replicas", config.cpu_replicas >= 1, "must be at least 1"),
        ("pretrain_epochs", config.pretrain_epochs is None or config.pretrain_epochs >= 1, "must be at least 1"),
        ("unlabelled", config.unlabelled is None or Path(config.unlabelled).is_file(), "must be an existing file"),
        ("semi_supervised", config.semi_supervised != "teacher" or config.baseline,
         f"{config.semi_supervised} needs the baseline, which is the teacher (drop --no-baseline)"),
        ("bert_preset", not checkpoint or "://" in config.bert_preset or os.sep not in config.bert_preset
         or Path(config.bert_preset).is_dir(), "must be a KerasHub preset name or an existing directory"),
        ("embeddings", not checkpoint or config.embeddings == "random",
         f"does not apply to --arch {config.arch}, which starts from its preset's weights"),
    ]
    for name, ok, requirement in rules:
        if not ok:
            raise UserError(f"{flag_name(name)} {requirement} (got {getattr(config, name)!r})")


def one_line(text, width: int = 80) -> str:
    """A text (or an error) on one line, cut to `width` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# Operations, private helpers (_name) the pipeline calls: files, the output directory's lock, disk space and
# this process's role in a cluster. Every output is written to a hidden temporary name in its directory, then
# renamed, so an interrupted run never leaves half a file; directories are checked for writing, and TF_CONFIG
# read, before any expensive work.
# ----------------------------------------------------------------------------------------------------------


class DiskFull(UserError):
    """No space left where an output is written (a machine's fault, not a bug: one line, like a user's mistake)."""


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC or a full quota, as an OSError or as TensorFlow's own error text (the SavedModel writer)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path next to `path` (same extension); rename it over `path` only on success."""
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    except Exception as error:
        if _is_disk_full(error):
            raise DiskFull(f"no space left in {path.parent} while writing {path.name}") from None
        raise
    finally:
        if temporary.exists():
            temporary.unlink()


def _write_text(path: Path, text: str) -> None:
    with _atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with _atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def _save_figure(figure, path: Path) -> None:
    with _atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")


def _save_model(model, path: Path) -> None:
    with _atomic_path(path) as temporary:
        model.save(temporary)


@contextlib.contextmanager
def _atomic_directory(path: Path):
    """Yield a temporary directory next to `path`; on success it replaces `path` (and whatever was there)."""
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        yield temporary
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.with_name(f".old-{os.getpid()}-{path.name}")
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as error:
        if _is_disk_full(error):
            raise DiskFull(f"no space left in {path.parent} while writing {path.name}/") from None
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _prepare_output_dir(path: Path) -> Path:
    """Create the output directory and prove it is writable, before any expensive work."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output directory is a file: {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"cannot write to the output directory {path}: {error.strerror}") from None
    return path


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _output_lock(output_dir: Path, name: str = "run"):
    """Hold OUTPUT_DIR/.NAME.lock (this process's id, host and start time) while a run writes there, so that a
    second run into the same directory is refused at start-up instead of mixing its files with the first's. A
    lock left by a process that no longer runs on this host is taken over, with a note."""
    lock = output_dir / f".{name}.lock"
    record = {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, host, started = int(holder["pid"]), str(holder["host"]), str(holder["started"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host, started = -1, platform.node(), "an unknown time"  # unreadable: a half-written lock
            if host != platform.node() or (pid > 0 and _process_running(pid)):
                raise UserError(f"another run is writing to {output_dir}: process {pid} on {host}, started "
                                f"{started} (wait for it to finish, or give another --output-dir; if it is gone, "
                                f"delete {lock})") from None
            print(f"note: taking over the lock of an earlier run that no longer runs (process {pid}, started "
                  f"{started})", file=sys.stderr)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(record))
        break
    else:
        raise UserError(f"cannot take the lock {lock}: another run took it at the same moment")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _megabytes(size: float) -> str:
    return f"{size / 1e6:,.0f} MB"


def _output_bytes_needed(parameters: int, blend: bool) -> int:
    """What a run writes, about: the weights in model.keras and twice in saved_model/ (its variables and its
    constants), the training state (the weights, two Adam moments and the best weights, held twice while a new
    state replaces the last), with a blend the baseline inside both model files, and 10 MB of reports."""
    weights = 4 * parameters
    return weights * (3 + 2 * 4) + (60_000_000 if blend else 0) + 10_000_000


def _check_free_space(output_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(f"not enough space in {output_dir}: this run's outputs need about {_megabytes(needed)}, "
                        f"{_megabytes(free)} are free")


@contextlib.contextmanager
def _disk_full_advice(output_dir: Path, state_dir: Path, needed: int):
    """Turn a full disk met while writing into one line: what was being written, how much a run needs, what
    is free, and whether the finished epochs' training state stays for the rerun."""
    try:
        yield
    except DiskFull as error:
        free = shutil.disk_usage(output_dir).free
        resumes = " (it resumes after the last finished epoch)" if (state_dir / "state.json").exists() else ""
        raise UserError(f"{error}: this run's outputs need about {_megabytes(needed)}, {_megabytes(free)} are free "
                        f"now; free some space and run the same command again{resumes}") from None


def _check_output_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"output path is a directory: {path}")
    if not path.parent.is_dir():
        raise UserError(f"output directory does not exist: {path.parent}")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None


class Stopwatch:
    """The seconds each named stage of a run took, and the whole run so far: the one owner of timing."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float | list[float]] = {}

    @contextlib.contextmanager
    def timed(self, name: str):
        """Time the block; a stage timed in several blocks (the baseline: fitted, then scored) adds them up."""
        started = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def record(self, name: str, seconds: float | list[float]) -> None:
        self.seconds[name] = seconds

    def summary(self) -> dict:
        """Every stage and the total so far, rounded to hundredths of a second, for the report."""
        seconds = {**self.seconds, "total_s": time.perf_counter() - self.started}
        return {name: np.round(value, 2).tolist() for name, value in seconds.items()}


@dataclass(frozen=True)
class ClusterRole:
    """This process's place in a cluster: the chief writes the model, figures and reports; the others train."""
    chief: bool
    name: str     # e.g. worker-1
    workers: int  # in the whole cluster
    index: int = 0  # this task's place among them: the chief first, then the workers in order


def _cluster_role() -> ClusterRole | None:
    """This process's place in the cluster that TF_CONFIG describes, or None when TF_CONFIG is not set.

    The chief is the task of type chief, or worker 0 when the cluster has no chief. Checked before any
    expensive work."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        description = json.loads(raw)
        cluster, task = description["cluster"], description["task"]
        task_type, index = task["type"], int(task["index"])
        addresses = cluster[task_type]
    except (ValueError, KeyError, TypeError) as error:
        example = '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
        raise UserError(f"TF_CONFIG is not a cluster description like {example} "
                        f"({type(error).__name__}: {error})") from None
    if task_type not in ("chief", "worker") or set(cluster) - {"chief", "worker"}:
        raise UserError(f"TF_CONFIG: only chief and worker tasks are supported (got {sorted(set(cluster))})")
    if not 0 <= index < len(addresses):
        raise UserError(f"TF_CONFIG: task index {index} is outside the {len(addresses)} {task_type} address(es)")
    chief = task_type == "chief" or (index == 0 and "chief" not in cluster)
    place = index + (len(cluster.get("chief", [])) if task_type == "worker" else 0)
    return ClusterRole(chief=chief, name=f"{task_type}-{index}", workers=sum(map(len, cluster.values())), index=place)


# ----------------------------------------------------------------------------------------------------------
# Data: read the CSV, find the columns, encode the labels, drop bad rows, split
# ----------------------------------------------------------------------------------------------------------


def check_csv_file(path: Path) -> None:
    """Refuse a missing, empty or binary file, from its first 64 KB."""
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        raise UserError(f"expected a CSV file but got a directory: {path}")
    with open(path, "rb") as handle:
        head = handle.read(65536)
    if not head.strip():
        raise UserError(f"the file is empty: {path}")
    if b"\x00" in head:
        raise UserError(f"not a CSV text file (it contains binary data): {path}")


def with_text_encoding(path: Path, read):
    """Return read(encoding) for UTF-8; if the file is not valid UTF-8, warn and read it again as Latin-1
    (which decodes any bytes). The read itself finds out, so the file is not scanned an extra time."""
    try:
        return read("utf-8")
    except UnicodeDecodeError:
        print(f"warning: {path} is not valid UTF-8; reading it as Latin-1", file=sys.stderr)
        return read("latin-1")


def check_row_widths(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """pandas reads rows with one more field than the header as an index of their first fields: refuse them,
    or the columns would silently shift by one."""
    if not isinstance(frame.index, pd.RangeIndex):
        raise UserError(f"could not parse {path} as CSV: its rows have more fields than its header "
                        f"({len(frame.columns)} names); quote texts that hold the separator")
    return frame


class StageProgress:
    """How far a long stage has come: `units` done of `total`, the rate and the time left. On a terminal one line
    rewritten in place (at most twice a second); in a log a line once LOG_EVERY seconds have passed since the
    last such line of any stage (or the start), so that neither a long stage nor a row of short ones is a minute
    of silence. (Training's epochs have Keras' progress bar on a terminal: they ask for the log lines only.)"""
    # In a log under a minute apart with a step's time added: up to 20 s (a chunk of the baseline's grading took 12
    # s on a busy 2-core machine, and 50 s between lines then left a 61 s gap: docs/RESULTS.md).
    LOG_EVERY, TERMINAL_EVERY = 40.0, 0.5
    logged = {time.monotonic: time.monotonic()}  # clock -> when the last log line of any stage was printed

    def __init__(self, stage: str, total: int, unit: str, first: int = 0, terminal: bool | None = None,
                 clock=time.monotonic, one: str | None = None):
        self.stage, self.total, self.unit, self.first, self.clock = stage, total, unit, first, clock
        self.one = one or unit[:-1]  # the unit's singular
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.started = self.last = clock()
        if not self.terminal:
            self.last = min(self.started, self.logged.get(clock, self.started))
        self.shown = False

    def __call__(self, done: int) -> None:
        now = self.clock()
        if now - self.last < (self.TERMINAL_EVERY if self.terminal else self.LOG_EVERY) or done >= self.total:
            return
        self.last = now
        seconds_each = (now - self.started) / max(1, done - self.first)
        per_second = 1 / seconds_each
        rate = (f"{seconds_each:.2f} s a {self.one}" if seconds_each >= 1
                else f"{per_second:.{0 if per_second >= 10 else 1}f} {self.unit} a second")
        left = seconds_each * (self.total - done)
        line = (f"  {self.stage}{done}/{self.total} {self.unit}, {rate}, about "
                + (f"{left:.0f} s left" if left < 90 else f"{left / 60:.0f} min left"))
        print(f"\r{line}\033[K" if self.terminal else line, end="" if self.terminal else "\n", flush=True)
        self.shown = True
        if not self.terminal:
            self.logged[self.clock] = now

    @classmethod
    @contextlib.contextmanager
    def heartbeat(cls, stage: str, total: int, unit: str):
        """For work done in other processes, which cannot say how far they are: in a log, from a thread, a line
        each LOG_EVERY seconds while the block runs. The block gets a function to tell it how many are done."""
        done, stop, started = [0], threading.Event(), time.monotonic()
        last = [min(started, cls.logged.get(time.monotonic, started))]

        def beat():
            while not stop.wait(1.0):
                now = time.monotonic()
                if now - max(last[0], cls.logged.get(time.monotonic, last[0])) >= cls.LOG_EVERY:
                    print(f"  {stage}{done[0]}/{total} {unit} done, {now - started:.0f} s so far", flush=True)
                    last[0] = cls.logged[time.monotonic] = now

        thread = threading.Thread(target=beat, daemon=True)
        if not sys.stdout.isatty():
            thread.start()
        try:
            yield lambda count: done.__setitem__(0, count)
        finally:
            stop.set()
            if thread.is_alive():
                thread.join()

    def close(self) -> None:
        if self.terminal and self.shown:
            print("\r\033[K", end="", flush=True)  # the next line starts clean


def read_csv(path: Path, encoding: str, source=None, **options):
    """pandas.read_csv of `source` (default: the file at `path`) with every cell as text; a malformed file becomes
    a UserError naming `path`."""
    try:
        frame = pd.read_csv(path if source is None else source, encoding=encoding, dtype=str,
                            keep_default_na=False, na_values=[""], **options)
        if isinstance(frame, pd.DataFrame):
            return check_row_widths(frame, path)
        return (check_row_widths(chunk, path) for chunk in frame)
    except UnicodeDecodeError:
        raise  # For with_text_encoding, which reads the file again as Latin-1.
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        raise UserError(f"could not parse {path} as CSV: {str(error).splitlines()[0]}") from None


def read_csv_chunks(path: Path, encoding: str, chunk_rows: int, sep: str = ",", **options):
    """The CSV in DataFrames of chunk_rows rows, so memory stays bounded whatever the file's size."""
    try:
        yield from read_csv(path, encoding, chunksize=chunk_rows, sep=sep, **options)
    except UnicodeDecodeError:
        raise
    except (pd.errors.ParserError, ValueError) as error:
        raise UserError(f"could not parse {path} as CSV: {str(error).splitlines()[0]}") from None


def find_column(columns, candidates, override: str | None, kind: str, flag: str) -> str:
    """Return the column named `override`, or the first of `candidates` present (case-insensitively)."""
    by_lower = {str(column).strip().lower(): column for column in columns}
    wanted = [override] if override else list(candidates)
    for name in wanted:
        if name.strip().lower() in by_lower:
            return by_lower[name.strip().lower()]
    found = ", ".join(repr(str(column)) for column in columns)
    expected = repr(override) if override else " or ".join(repr(name) for name in candidates)
    raise UserError(f"no {kind} column {expected} in the CSV (columns found: {found}); use {flag}")


# The figures of each model, by name, in the order the report shows them: two classes (precision, recall and F1
# of the positive class), or more (macro and weighted averages; ROC AUC one-vs-rest, macro). The terminal's
# table shows the first list, or the short list for several classes.
BINARY_FIGURES = ("accuracy", "precision", "recall", "f1", "roc_auc")
MULTICLASS_FIGURES = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
                      "recall_weighted", "f1_weighted", "roc_auc")
MULTICLASS_TABLE = ("accuracy", "f1_macro", "f1_weighted", "roc_auc")


@dataclass(frozen=True)
class LabelSet:
    """The classes of a run, in the model's order, and everything their number changes: the output layer and
    the training targets, the decision, the shown probability, the figures, the ROC curves, what an explanation
    is about, and predict's columns. This class is three or more (a softmax, the most probable class wins);
    TwoClasses is two (a sigmoid: the positive class's probability, decided at --threshold). label_set chooses:
    the one place the number of classes decides. Every probability the script handles is (reviews, classes)
    (class_columns makes the sigmoid's two columns)."""
    names: tuple[str, ...]
    chosen_by: str = ""  # how the positive class of two was chosen, for the log
    binary = False
    figures, table, interval_figures = MULTICLASS_FIGURES, MULTICLASS_TABLE, ("accuracy", "f1_macro", "roc_auc")
    shown_column = "probability_predicted"
    decision_record = {}  # what compute_metrics adds after the confusion matrix

    @property
    def output(self) -> tuple[int, str]:
        """The output layer's units and activation."""
        return len(self.names), "softmax"

    def targets(self, probabilities: np.ndarray) -> np.ndarray:
        """Class probabilities (texts, classes) as the training loop's labels: whole rows."""
        return probabilities

    def threshold(self, threshold: float | None) -> float:
        """predict --threshold: only for two classes."""
        if threshold is not None:
            raise UserError(f"--threshold applies to two-class models; this one has {len(self.names)} classes")
        return DECISION_THRESHOLD

    def decide(self, probabilities: np.ndarray, threshold: float = DECISION_THRESHOLD) -> np.ndarray:
        """Class indices: the most probable class."""
        return np.argmax(probabilities, axis=1)

    def decide_tensor(self, probabilities):
        return tf.argmax(probabilities, axis=1, output_type=tf.int32)

    def shown(self, probabilities: np.ndarray) -> np.ndarray:
        """The probability shown beside a prediction (column shown_column): the predicted class's."""
        return probabilities.max(axis=1)

    def confidence(self, shown: np.ndarray) -> np.ndarray:
        """How sure a shown probability is, for ordering the mistakes."""
        return shown

    def explained(self, probabilities: np.ndarray) -> int:
        """The class an explanation of a text (its row of probabilities) is about: the predicted class."""
        return int(np.argmax(probabilities))

    def explained_named(self, predicted_name: str) -> int:
        return self.names.index(predicted_name)

    @property
    def auc_classes(self) -> range:
        """The classes whose one-vs-rest ROC AUC is averaged into roc_auc."""
        return range(len(self.names))

    def log_loss_input(self, probabilities: np.ndarray) -> np.ndarray:
        """Probabilities as scikit-learn's log_loss takes them: rows that sum to one exactly."""
        probabilities = np.clip(probabilities, 1e-7, 1)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def headline_counts(self, counts: np.ndarray) -> dict:
        return {}

    def positive_note(self) -> str:
        return ""

    def headline_scores(self, labels, predicted, probabilities) -> dict:
        """The figures of self.figures (but the confusion matrix) from the predictions."""
        classes = list(range(len(self.names)))
        scores = {"accuracy": float(metrics.accuracy_score(labels, predicted))}
        for average in ("macro", "weighted"):
            precision, recall, f1, _ = metrics.precision_recall_fscore_support(
                labels, predicted, labels=classes, average=average, zero_division=0)
            scores.update({f"precision_{average}": float(precision), f"recall_{average}": float(recall),
                           f"f1_{average}": float(f1)})
        scores["roc_auc"] = float(metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro",
                                                        labels=classes))
        return scores

    def roc_curves(self, labels, probabilities: dict[str, np.ndarray]) -> tuple[dict, str]:
        """One curve per class, one-vs-rest, for the primary (first) model: {name: (is the class, scores)}."""
        primary, values = next(iter(probabilities.items()))
        return ({name: (labels == index, values[:, index]) for index, name in enumerate(self.names)},
                f"ROC curves one-vs-rest ({primary}, test set)")

    def prediction_columns(self, probabilities: np.ndarray) -> tuple[str, dict]:
        """predict's columns for a CSV: the predicted class's (predicted_label), and probability_NAME per class."""
        return "predicted_label", {f"probability_{name}": np.round(probabilities[:, index], 4)
                                   for index, name in enumerate(self.names)}

    def losses_and_answers(self, labels, outputs):
        """Each review's loss, its predicted class and its true class (as floats), from the softmax's output
        (labels: class indices, or a teacher's rows of class probabilities)."""
        predicted = tf.cast(tf.argmax(outputs, axis=1), tf.float32)
        if labels.shape.rank == 2:  # a teacher's class probabilities
            return (keras.losses.categorical_crossentropy(labels, outputs), predicted,
                    tf.cast(tf.argmax(labels, axis=1), tf.float32))
        return keras.losses.sparse_categorical_crossentropy(labels, outputs), predicted, labels

    def leaning(self, labels):
        """The class each training label leans to (a teacher's row: its most probable class), for class weights."""
        return tf.argmax(labels, axis=1) if labels.shape.rank == 2 else labels


class TwoClasses(LabelSet):
    """Two classes: the second is the positive class, the one the sigmoid's probability, precision, recall, F1
    and the ROC curve are about; a text gets it when its probability is at least the threshold."""
    binary = True
    figures = table = BINARY_FIGURES
    interval_figures = ("accuracy", "f1", "roc_auc")
    shown_column = "probability_positive"
    decision_record = {"threshold": DECISION_THRESHOLD}

    @property
    def output(self) -> tuple[int, str]:
        return 1, "sigmoid"

    def targets(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities[:, 1]  # what the sigmoid learns

    def threshold(self, threshold: float | None) -> float:
        return DECISION_THRESHOLD if threshold is None else threshold

    def decide(self, probabilities: np.ndarray, threshold: float = DECISION_THRESHOLD) -> np.ndarray:
        return (probabilities[:, 1] >= threshold).astype(int)

    def decide_tensor(self, probabilities):
        return tf.cast(probabilities[:, 1] >= DECISION_THRESHOLD, tf.int32)

    def shown(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities[:, 1]  # so that it reads the same way for every review

    def confidence(self, shown: np.ndarray) -> np.ndarray:
        return np.abs(shown - DECISION_THRESHOLD)

    def explained(self, probabilities: np.ndarray) -> int:
        return 1  # the positive class, so that scores read the same way for every text

    def explained_named(self, predicted_name: str) -> int:
        return 1

    @property
    def auc_classes(self) -> range:
        return range(1, 2)

    def log_loss_input(self, probabilities: np.ndarray) -> np.ndarray:
        return np.clip(probabilities[:, 1], 1e-7, 1 - 1e-7)  # the positive column, as log_loss takes it

    def headline_counts(self, counts: np.ndarray) -> dict:
        return {"positive": int(counts[1]), "negative": int(counts[0])}

    def positive_note(self) -> str:
        return f"; positive class {self.names[1]!r} ({self.chosen_by})"

    def headline_scores(self, labels, predicted, probabilities) -> dict:
        return {"accuracy": float(metrics.accuracy_score(labels, predicted)),
                "precision": float(metrics.precision_score(labels, predicted, zero_division=0)),
                "recall": float(metrics.recall_score(labels, predicted, zero_division=0)),
                "f1": float(metrics.f1_score(labels, predicted, zero_division=0)),
                "roc_auc": float(metrics.roc_auc_score(labels, probabilities[:, 1]))}

    def roc_curves(self, labels, probabilities: dict[str, np.ndarray]) -> tuple[dict, str]:
        """One curve per model, for the positive class."""
        return ({name: (labels == 1, values[:, 1]) for name, values in probabilities.items()},
                f"ROC curve (test set, positive class {self.names[1]!r})")

    def prediction_columns(self, probabilities: np.ndarray) -> tuple[str, dict]:
        """predicted_sentiment and probability_positive, as always."""
        return "predicted_sentiment", {"probability_positive": np.round(probabilities[:, 1], 4)}

    def losses_and_answers(self, labels, outputs):
        """From the sigmoid's output (labels: 0 or 1, or a teacher's probability of the positive class)."""
        losses = keras.losses.binary_crossentropy(labels[:, None], outputs)
        return (losses, tf.cast(outputs[:, 0] >= DECISION_THRESHOLD, tf.float32),
                tf.cast(labels >= DECISION_THRESHOLD, tf.float32))

    def leaning(self, labels):
        return tf.round(labels)


def label_set(names, chosen_by: str = "") -> LabelSet:
    """The classes of these names: the one place the number of classes decides."""
    return (TwoClasses if len(names) == 2 else LabelSet)(tuple(names), chosen_by)


def counted_classes(count: int) -> LabelSet:
    """The rules of `count` classes, where their names do not matter."""
    return label_set(tuple(str(index) for index in range(count)))


def class_order(values: list[str]) -> list[str]:
    """Numbers in numeric order (star ratings: 1, 2, ..., 10), anything else alphabetically."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def encode_labels(labels: pd.Series, positive_label: str | None = None) -> tuple[np.ndarray, LabelSet]:
    """Class indices for label strings, and the classes. Positive/negative-style labels (positive/negative,
    pos/neg, 1/0, true/false, any case) keep their meaning; other values are compared after stripping spaces,
    their case kept. With two other values the positive class is --positive-label, else the less frequent one
    (as in spam or fraud detection)."""
    stripped = labels.astype(str).str.strip()
    lowered = stripped.str.lower()
    known = set(lowered) <= POSITIVE_LABELS | NEGATIVE_LABELS
    if known:
        stripped = lowered.isin(POSITIVE_LABELS).map({True: "positive", False: "negative"})
        values = [name for name in CLASS_NAMES if name in set(stripped)]
        chosen_by = "positive/negative labels"
    else:
        values = class_order(list(stripped.unique()))
        chosen_by = "the less frequent class"
    if len(values) < 2:
        raise UserError(f"only one label value in the data: {values[0]!r}; a classifier needs at least two classes")
    if len(values) > MAX_CLASSES:
        raise UserError(f"{len(values)} label values, more than the {MAX_CLASSES} classes supported: "
                        f"{', '.join(map(repr, values[:10]))}, ... (is --label-column the right column?)")
    if positive_label is not None:
        wanted = positive_label.strip()
        if known and wanted.lower() in POSITIVE_LABELS | NEGATIVE_LABELS:
            wanted = "positive" if wanted.lower() in POSITIVE_LABELS else "negative"
        matches = [value for value in values if value == wanted]
        if len(values) != 2:
            raise UserError(f"--positive-label needs two classes, but the labels have {len(values)}")
        if not matches:
            raise UserError(f"--positive-label {positive_label!r} is not one of the labels "
                            f"({', '.join(map(repr, values))})")
        positive, chosen_by = matches[0], "--positive-label"
    elif chosen_by != "positive/negative labels":
        counts = stripped.value_counts()
        positive = min(values, key=lambda value: (counts[value], -values.index(value)))
    else:
        positive = values[-1]
    classes = label_set(values, chosen_by)
    if classes.binary:  # the positive class second
        classes = label_set([value for value in values if value != positive] + [positive], chosen_by)
    index = {value: position for position, value in enumerate(classes.names)}
    return stripped.map(index).to_numpy(dtype=np.int32), classes


class FileArray:
    """A file's raw values (bytes, or int32 token ids) read where asked (array[start:end], a NumPy array) with a
    plain read, not mapped: what was read stays in the system's file cache, not in the process's memory (on
    Linux 6.x one value read through a map brings its whole 2 MB page-cache folio into the process's RSS)."""

    def __init__(self, path: Path, dtype=np.uint8):
        self.file, self.lock, self.dtype = open(path, "rb"), threading.Lock(), np.dtype(dtype)
        self.size = path.stat().st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> np.ndarray:
        start, stop, _ = span.indices(self.size)
        with self.lock:  # tf.data reads on its own threads
            self.file.seek(start * self.dtype.itemsize)
            return np.frombuffer(self.file.read(max(0, stop - start) * self.dtype.itemsize), dtype=self.dtype)


@dataclass(frozen=True)
class Texts:
    """Texts as their UTF-8 bytes one after another (`data`: a uint8 array in memory, or FileArray of a file)
    and where each starts and ends there: a sequence of str decoded only when used, so a split of millions of
    reviews holds only its offsets. texts[i] is a str; texts[a:b] and texts[rows] are object arrays of str (the
    texts in use); take(rows) is a Texts of those rows over the same bytes."""
    data: object
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, texts) -> Texts:
        """From strings, in memory."""
        encoded = [str(text).encode("utf-8") for text in texts]
        return cls.from_lengths(np.frombuffer(b"".join(encoded), dtype=np.uint8),
                                np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))

    @classmethod
    def from_lengths(cls, data, lengths: np.ndarray) -> Texts:
        """Texts of these byte lengths, one after another in `data`."""
        ends = np.cumsum(lengths, dtype=np.int64)
        return cls(data, ends - lengths, ends)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return bytes(self.data[self.starts[index]:self.ends[index]]).decode("utf-8")
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        texts = np.empty(len(rows), dtype=object)
        texts[:] = [bytes(self.data[start:end]).decode("utf-8") for start, end in zip(self.starts[rows].tolist(),
                                                                                    self.ends[rows].tolist())]
        return texts

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self[start:start + 4096]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:]

    def take(self, rows: np.ndarray) -> Texts:
        return Texts(self.data, self.starts[rows], self.ends[rows])

    def tolist(self) -> list[str]:
        return list(self)


class ChainedTexts:
    """Sequences of texts read one after the other as one, by slices (text_dataset's), without a copy of all."""

    def __init__(self, *parts):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        pieces, offset = [np.array([], dtype=object)], 0
        for part in self.parts:
            if max(start - offset, 0) < min(stop - offset, len(part)):
                pieces.append(np.asarray(part[max(start - offset, 0):min(stop - offset, len(part))], dtype=object))
            offset += len(part)
        return np.concatenate(pieces)


@dataclass
class LabelledTexts:
    texts: Texts        # strings given (an object array, a list) become a Texts
    labels: np.ndarray  # int32 class indices (with two classes, 1 is the positive one)

    def __post_init__(self):
        if not isinstance(self.texts, Texts):
            self.texts = Texts.of(self.texts)


@dataclass
class LoadedData(LabelledTexts):
    """The usable rows of the CSV, their classes, and how many rows were read and dropped for each reason; the
    rows with a text and an empty label are unlabelled text (each text once), kept apart."""
    classes: LabelSet = label_set(CLASS_NAMES)
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    unlabelled: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    file_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # each file's first store byte
    file_rows: list = field(default_factory=list)    # rows read of each file
    file_stored: list = field(default_factory=list)  # texts stored of each file
    store_starts: np.ndarray | None = None           # where each stored text starts (load_dataset's keep_places)


def column_separator(path: Path, sep: str | None) -> str:
    """--sep as given (tab, \\t or one character), else a tab for a .tsv file and a comma for anything else."""
    if sep is None:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    sep = {"tab": "\t", "\\t": "\t"}.get(sep.lower(), sep)
    if len(sep) != 1:
        raise UserError(f"--sep must be one character or tab (got {sep!r})")
    return sep


def several_files(data: str) -> bool:
    """Whether --data names a directory or a glob of files (not one file)."""
    return Path(data).is_dir() or (not Path(data).exists() and any(mark in data for mark in "*?["))


def data_files(data: str) -> list[Path]:
    """The files of --data: the file itself; the .csv and .tsv files of a directory; or the files a glob
    matches (`reviews-*.csv`), in name order, so every run and every worker sees the same rows in the same order."""
    path = Path(data)
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.is_file() and child.suffix.lower() in
                       (".csv", ".tsv"))
        if not files:
            raise UserError(f"no .csv or .tsv file in the directory {path}")
        return files
    if several_files(data):  # a glob
        files = sorted(Path(match) for match in glob.glob(data) if Path(match).is_file())
        if not files:
            raise UserError(f"no file matches {data}")
        return files
    return [path]


@functools.lru_cache(maxsize=256)
def file_digest(path: str, size: int, modified_ns: int) -> str:
    """SHA-1 of a file's bytes, read in blocks; the size and modification time make a changed file a new key."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(data: list[Path], unlabelled: str | None) -> str:
    """One SHA-1 of the bytes of these files of --data and of --unlabelled, in their order (each file hashed
    once per process): a moved or renamed file is the same data, an edited one is not."""
    files = data + ([Path(unlabelled)] if unlabelled else [])
    digest = hashlib.sha1()
    for path in files:
        check_csv_file(path)
        stat = path.stat()
        digest.update(file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


def utf8_hash(text: bytes) -> int:
    """A text's 64-bit BLAKE2b hash: equal texts, equal hashes (and two of 2 million distinct texts share one
    with a chance of about 1e-7)."""
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def text_hashes(texts) -> np.ndarray:
    return np.fromiter((utf8_hash(text.encode("utf-8")) for text in texts), dtype=np.uint64, count=len(texts))


class TextStore:
    """Texts written one after another as UTF-8 into the file `path` (without one, into memory) as the data is
    read, so the table is never held whole: append() returns each text's 64-bit hash (BLAKE2b, for finding
    duplicates); mark() and rewind() undo a file's texts (read again in another encoding); texts() gives all of
    them as Texts read from the file."""

    def __init__(self, path: Path | None):
        self.path, self.lengths = path, []
        self.file = open(path, "wb") if path else io.BytesIO()

    def append(self, texts) -> np.ndarray:
        encoded = [text.encode("utf-8") for text in texts]
        try:
            self.file.write(b"".join(encoded))
        except OSError as error:
            if _is_disk_full(error):
                raise DiskFull(f"no space left in {self.path.parent} while writing {self.path.name}") from None
            raise
        self.lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        return np.fromiter(map(utf8_hash, encoded), dtype=np.uint64, count=len(encoded))

    def mark(self) -> tuple[int, int]:
        return self.file.tell(), len(self.lengths)

    def rewind(self, mark: tuple[int, int]) -> None:
        self.file.seek(mark[0])
        self.file.truncate()
        del self.lengths[mark[1]:]

    def texts(self) -> Texts:
        if self.path is None:
            data = np.frombuffer(self.file.getvalue(), dtype=np.uint8)
        else:
            self.file.close()
            data = FileArray(self.path)
        return Texts.from_lengths(data, np.concatenate([np.zeros(0, np.int64)] + self.lengths))


@dataclass
class RowsRead:
    """What pass one keeps of the rows of --data: for each labelled row its place in the TextStore, its text's
    hash and its label; the places of the unlabelled rows (a text, an empty label); counts. Never the table."""
    columns: list | None = None        # the first file's, which every file must have
    text_column: str = ""
    label_column: str = ""
    rows_read: int = 0
    missing_text: int = 0
    stored: int = 0                    # texts written to the store so far
    labelled: list = field(default_factory=list)     # arrays of store rows, chunk by chunk
    hashes: list = field(default_factory=list)
    labels: list = field(default_factory=list)       # Series of label strings, chunk by chunk
    unlabelled: list = field(default_factory=list)
    file_starts: list = field(default_factory=list)  # where each file's texts begin in the store (DataShare)
    file_rows: list = field(default_factory=list)    # rows read of each file
    file_stored: list = field(default_factory=list)  # texts stored of each file

    def mark(self) -> dict:
        return {"columns": self.columns, "rows_read": self.rows_read, "missing_text": self.missing_text,
                "stored": self.stored, "chunks": len(self.labelled)}

    def rewind(self, mark: dict) -> None:
        """Back to what it was at `mark` (a file is read again in another encoding)."""
        self.columns, self.rows_read, self.missing_text, self.stored = (
            mark["columns"], mark["rows_read"], mark["missing_text"], mark["stored"])
        for chunks in (self.labelled, self.hashes, self.labels, self.unlabelled):
            del chunks[mark["chunks"]:]

    def add(self, chunk: pd.DataFrame, store: TextStore) -> None:
        """One chunk of rows: the empty ones counted, the rest's texts into the store."""
        texts, labels = chunk[self.text_column], chunk[self.label_column]
        missing_text = (texts.isna() | (texts.fillna("").str.strip() == "")).to_numpy()
        missing_label = ~missing_text & (labels.isna() | (labels.fillna("").str.strip() == "")).to_numpy()
        kept = ~missing_text
        hashes = store.append(texts[kept].tolist())
        rows = self.stored + np.arange(int(kept.sum()))
        self.stored += len(rows)
        self.rows_read, self.missing_text = self.rows_read + len(chunk), self.missing_text + int(missing_text.sum())
        labelled = ~missing_label[kept]
        self.labelled.append(rows[labelled])
        self.hashes.append(hashes[labelled])
        self.labels.append(labels[kept][labelled].astype("category"))
        self.unlabelled.append(rows[~labelled])

    def file(self, path: Path, encoding: str, separator: str, max_rows: int | None, store: TextStore,
             config: TrainConfig) -> None:
        """Every chunk of one file (its first max_rows rows), its columns checked against the first file's."""
        progress = StageProgress("reading: ", max(1, path.stat().st_size // 2**20), "MB", one="MB")
        with open(path, "rb") as handle:
            header = list(read_csv(path, encoding, source=handle, nrows=0, sep=separator).columns)
            if self.columns is None:
                self.columns = header
                self.text_column = find_column(header, TEXT_COLUMN_NAMES, config.text_column, "text", "--text-column")
                self.label_column = find_column(header, LABEL_COLUMN_NAMES, config.label_column, "label",
                                                "--label-column")
            elif header != self.columns:
                raise UserError(f"{path} has the columns {', '.join(map(repr, map(str, header)))}, not those of the "
                                f"first file ({', '.join(map(repr, map(str, self.columns)))}): every file of --data "
                                "needs the same columns")
            handle.seek(0)
            for chunk in read_csv_chunks(path, encoding, READ_CHUNK_ROWS, separator, source=handle, nrows=max_rows):
                self.add(chunk, store)
                progress(handle.tell() // 2**20)
        progress.close()


def read_data_files(files: list[Path], config: TrainConfig, store: TextStore,
                    limits: list[int] | None = None) -> RowsRead:
    """Pass one over the files of --data in order, chunk by chunk (the first --max-rows rows in all; with
    `limits`, limits[i] rows of file i, and none of a file with 0: a cluster worker's share, WorkersPlan): each
    file is checked and decoded on its own (read again as Latin-1 if it is not UTF-8)."""
    rows = RowsRead()
    for index, path in enumerate(files):
        if limits is None:
            left = None if config.max_rows is None else config.max_rows - rows.rows_read
        else:
            left = limits[index] if index < len(limits) else 0
        marks, before = (rows.mark(), store.mark()), (rows.rows_read, rows.stored)
        rows.file_starts.append(marks[1][0])

        def read(encoding: str) -> None:
            rows.rewind(marks[0])
            store.rewind(marks[1])
            rows.file(path, encoding, separator, left, store, config)

        if left != 0:
            check_csv_file(path)
            separator = column_separator(path, config.sep)
            with_text_encoding(path, read)
        rows.file_rows.append(rows.rows_read - before[0])
        rows.file_stored.append(rows.stored - before[1])
        if limits is None and config.max_rows is not None and rows.rows_read >= config.max_rows:
            break
    return rows


def load_dataset(config: TrainConfig, store: Path | None = None, keep_places: bool = False) -> LoadedData:
    """Read the CSV (or the files of a directory or glob) chunk by chunk, each text into a TextStore (the file
    `store`, else memory) as it comes; drop empty and duplicate reviews and count them. Memory holds a hash and
    a label of each row, never the table; the texts are read back from the store when used. `keep_places`:
    keep where every stored text starts (a cluster's chief tells the others their fates: WorkersPlan)."""
    texts = TextStore(store)
    rows = read_data_files(data_files(config.data), config, texts)
    if rows.rows_read == 0:
        raise UserError(f"the CSV has a header but no rows: {config.data}")
    stored = texts.texts()
    labelled, hashes = (np.concatenate([np.zeros(0, np.int64)] + rows.labelled),
                        np.concatenate([np.zeros(0, np.uint64)] + rows.hashes))
    # A duplicate that lands on both sides of the split would inflate the test score, so drop it first. Only
    # labelled rows count here: a labelled review is kept even if the same text also came without a label. (Two
    # texts are equal when their hashes are: utf8_hash.)
    first = np.zeros(len(hashes), dtype=bool)
    first[np.unique(hashes, return_index=True)[1]] = True
    unlabelled = np.concatenate([np.zeros(0, np.int64)] + rows.unlabelled)
    if not len(labelled):
        raise UserError(f"no row of {config.data} has both a text and a label ({len(unlabelled)} have a "
                        f"text without a label); is --label-column the right column?")
    labels = pd.Series(pd.api.types.union_categoricals(rows.labels, ignore_order=True)
                       if len(rows.labels) > 1 else rows.labels[0]).reset_index(drop=True)
    encoded, classes = encode_labels(labels[first], config.positive_label)
    if first.sum() < MIN_ROWS:
        raise UserError(f"too few usable rows to split into train, validation and test: {first.sum()} "
                        f"(need at least {MIN_ROWS})")
    dropped = {"missing_text": rows.missing_text, "duplicate_text": int((~first).sum())}
    return LoadedData(stored.take(labelled[first]), encoded, classes, rows_read=rows.rows_read, dropped=dropped,
                      unlabelled=stored.take(unlabelled), file_starts=np.array(rows.file_starts, dtype=np.int64),
                      file_rows=rows.file_rows, file_stored=rows.file_stored,
                      store_starts=stored.starts if keep_places else None)


def read_unlabelled_file(path: Path, text_column: str | None) -> np.ndarray:
    """The texts of an --unlabelled file: one per line of a .txt file, or the text column of a CSV or TSV file
    (found as for --data). Empty texts are left out."""
    check_csv_file(path)
    if path.suffix.lower() == ".txt":
        lines = with_text_encoding(path, lambda encoding: path.read_text(encoding=encoding).splitlines())
        return np.array([line for line in lines if line.strip()], dtype=object)
    sep = column_separator(path, None)
    frame = with_text_encoding(path, lambda encoding: read_csv(path, encoding, sep=sep))
    column = find_column(frame.columns, TEXT_COLUMN_NAMES, text_column, "text", "--text-column")
    texts = frame[column].dropna()
    return texts[texts.str.strip() != ""].to_numpy(dtype=object)


@dataclass
class DataSplits:
    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts


def class_counts_text(names, counts) -> str:
    return ", ".join(f"{name!r} ({count} rows)" for name, count in zip(names, counts))


def text_keys(texts, seed: int) -> np.ndarray:
    """Each text's 64-bit hash keyed by --seed (BLAKE2b): where a row goes depends on its text and the seed alone,
    never on the order of the rows or how the files are cut."""
    key = str(seed).encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "little")
                        for text in texts), dtype=np.uint64, count=len(texts))


def split_shares(rows: int, test_fraction: float, validation_fraction: float) -> tuple[int, int]:
    """How many of a class's rows (at least MIN_CLASS_ROWS) go to test and to validation: --test-fraction of
    them, then --validation-fraction of the rest, rounded, at least one each and one left for training."""
    test = min(max(1, round(rows * test_fraction)), rows - 2)
    return test, min(max(1, round((rows - test) * validation_fraction)), rows - test - 1)


def split_dataset(data: LoadedData, test_fraction: float, validation_fraction: float, seed: int) -> DataSplits:
    """The train/validation/test split, stratified and by a keyed hash of each text (text_keys): within each
    class the rows in the order of their keys, the first split_shares go to test, the next to validation, the
    rest to training, and each split is kept in key order. So a row's split, and the order the run sees the
    rows in, depend only on which rows there are, the fractions and --seed: shuffled rows or the same rows cut
    into other files split the same; each class's share is exact to a row. The test part is never used to
    choose anything."""
    labels, names = data.labels, data.classes.names
    counts = np.bincount(labels, minlength=len(names))
    too_small = [index for index, count in enumerate(counts) if count < MIN_CLASS_ROWS]
    if too_small:
        raise UserError(f"too few rows to put these classes in the training, validation and test splits: "
                        f"{class_counts_text([names[i] for i in too_small], counts[too_small])}; "
                        "add rows or drop the class")
    keys, parts = text_keys(data.texts, seed), {"test": [], "validation": [], "train": []}
    for index in range(len(names)):
        rows = np.flatnonzero(labels == index)
        rows = rows[np.argsort(keys[rows], kind="stable")]
        test, validation = split_shares(len(rows), test_fraction, validation_fraction)
        for name, chosen in zip(parts, np.split(rows, [test, test + validation])):
            parts[name].append(chosen)

    def part(name):
        chosen = np.concatenate(parts[name])
        chosen = chosen[np.argsort(keys[chosen], kind="stable")]
        return LabelledTexts(data.texts.take(chosen), labels[chosen])

    return DataSplits(part("train"), part("validation"), part("test"))


@dataclass
class UnlabelledTexts:
    """The unlabelled text of a run, each text once and none equal to a labelled one, and how it was counted;
    `sources`: where each came from (its place among the unlabelled rows of --data, then the --unlabelled file's)."""
    texts: np.ndarray
    counts: dict[str, int]
    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def gather_unlabelled(data: LoadedData, splits: DataSplits, unlabelled: str | None,
                      text_column: str | None) -> UnlabelledTexts:
    """The unlabelled rows of --data and the texts of --unlabelled, deduplicated. A text equal to a validation or
    test text is removed and counted, so that nothing the model is scored on is seen before scoring; one equal
    to a training text is a duplicate (its label is known)."""
    from_file = (read_unlabelled_file(Path(unlabelled), text_column) if unlabelled
                 else np.array([], dtype=object))
    texts = pd.Series(np.concatenate([data.unlabelled, from_file]), dtype=object)
    unique = texts[~texts.duplicated(keep="first")]
    equal_to_scored = equal_to_training = np.zeros(len(unique), dtype=bool)
    if len(unique):  # compared by their hashes, so no split's strings are held at once
        hashes = text_hashes(unique)
        equal_to_scored = np.isin(hashes, np.concatenate([text_hashes(splits.validation.texts),
                                                          text_hashes(splits.test.texts)]))
        equal_to_training = np.isin(hashes, text_hashes(splits.train.texts))
    kept = unique[~(equal_to_scored | equal_to_training)]
    counts = {"from_data": len(data.unlabelled), "from_file": len(from_file), "read": len(texts),
              "duplicates": int(len(texts) - len(unique) + equal_to_training.sum()),
              "equal_to_validation_or_test": int(equal_to_scored.sum()), "kept": len(kept)}
    return UnlabelledTexts(kept.to_numpy(dtype=object), counts, kept.index.to_numpy(dtype=np.int64))


def data_summary(data: LoadedData, splits: DataSplits, unlabelled: dict) -> dict:
    """The row counts of the run, for the report: read, dropped, labelled rows used, in each split and in each
    class, and the unlabelled text's counts (unlabelled_use)."""
    counts = np.bincount(data.labels, minlength=len(data.classes.names))
    return {
        "rows_read": data.rows_read, "dropped": data.dropped, "rows_used": len(data.labels),
        "train": len(splits.train.labels), "validation": len(splits.validation.labels),
        "test": len(splits.test.labels), **data.classes.headline_counts(counts),
        "classes": {name: int(count) for name, count in zip(data.classes.names, counts)},
        "unlabelled": unlabelled,
    }


def describe_unlabelled(counts: dict) -> str:
    """The unlabelled text in a few words, for the run's summary line (the counts of unlabelled_use)."""
    if not counts["read"]:
        return "no unlabelled text"
    used = f"{counts['used']} used" + (f", because {counts['not_used']}" if "not_used" in counts else "")
    return (f"unlabelled texts: {counts['read']} read ({counts['from_data']} rows without a label, "
            f"{counts['from_file']} from --unlabelled), {counts['duplicates']} duplicates and "
            f"{counts['equal_to_validation_or_test']} equal to a validation or test text removed; {used}")


def describe_classes(data: LoadedData) -> str:
    """One line for the log: the classes, which one is positive and why, and a warning about a small class."""
    names, counts = data.classes.names, np.bincount(data.labels, minlength=len(data.classes.names))
    text = f"{len(names)} classes: {class_counts_text(names, counts)}{data.classes.positive_note()}"
    smallest = int(np.argmin(counts))
    if counts[smallest] < SMALL_CLASS_SHARE * len(data.labels):
        text += (f"\nnote: the smallest class, {names[smallest]!r}, is {counts[smallest] / len(data.labels):.1%} "
                 "of the rows; the per-class figures show how it fares, and --class-weight balanced gives it "
                 "more weight")
    return text


STORED_FATES = ("dropped", "train", "validation", "test", "unlabelled")  # WorkersPlan's codes: index + 8 * class


@dataclass
class WorkersPlan:
    """What a cluster's chief, which reads every file, tells the workers that read only their own files
    (DataShare): `record`, the rows it read of each file (--max-rows), the texts it stored of each, the classes,
    the run's counts, how it learns from unlabelled text and its summary line; `fates`, each stored text's split
    and class, or unlabelled text kept, or dropped (STORED_FATES); `file_kept`, which texts of the --unlabelled
    file are kept. So a worker's rows fall into the same splits, in the same order, as if it had read every file."""
    record: dict
    fates: np.ndarray      # int64, one for each text stored from all the files
    file_kept: np.ndarray  # int64 0 or 1, one for each text of the --unlabelled file

    @classmethod
    def of(cls, data: LoadedData, splits: DataSplits, unlabelled: UnlabelledTexts, record: dict) -> WorkersPlan:
        place = functools.partial(np.searchsorted, data.store_starts)
        fates = np.zeros(len(data.store_starts), np.int64)
        for code, part in enumerate((splits.train, splits.validation, splits.test), start=1):
            fates[place(part.texts.starts)] = code + 8 * part.labels.astype(np.int64)
        from_data = unlabelled.sources < len(data.unlabelled)
        fates[place(data.unlabelled.starts[unlabelled.sources[from_data]])] = STORED_FATES.index("unlabelled")
        file_kept = np.zeros(unlabelled.counts["from_file"], np.int64)
        file_kept[unlabelled.sources[~from_data] - len(data.unlabelled)] = 1
        return cls({**record, "file_rows": data.file_rows, "file_stored": data.file_stored,
                    "classes": list(data.classes.names), "chosen_by": data.classes.chosen_by}, fates, file_kept)


def load_share(config: TrainConfig, store: Path | None, files: list[int],
               plan: WorkersPlan) -> tuple[LoadedData, DataSplits, UnlabelledTexts]:
    """A cluster worker's own `files` of --data (numbered from 0), read as the chief read them, and their texts
    in the splits the chief's `plan` gives them (each split in the order of its keys, as split_dataset's); the
    --unlabelled file's kept texts, which DataShare.restrict divides."""
    texts, record = TextStore(store), plan.record
    limits = [rows if index in files else 0 for index, rows in enumerate(record["file_rows"])]
    rows = read_data_files(data_files(config.data), config, texts, limits)
    stored, begins = texts.texts(), np.cumsum([0] + record["file_stored"])
    if rows.file_stored[:len(limits)] != [record["file_stored"][index] if index in files else 0
                                          for index in range(len(limits))]:
        raise UserError(f"the files of {config.data} are not the ones the chief read (changed while the workers "
                        "read them?): start every worker again")
    fates = np.concatenate([np.zeros(0, np.int64)] + [plan.fates[begins[index]:begins[index + 1]] for index in files
                                                      if index < len(limits)])
    codes, labels = fates % 8, (fates // 8).astype(np.int32)

    def part(code: int) -> LabelledTexts:
        chosen = np.flatnonzero(codes == code)
        chosen = chosen[np.argsort(text_keys(stored.take(chosen), config.seed), kind="stable")]
        return LabelledTexts(stored.take(chosen), labels[chosen])

    splits = DataSplits(part(1), part(2), part(3))
    own = stored.take(np.flatnonzero(codes == STORED_FATES.index("unlabelled")))
    from_file = (read_unlabelled_file(Path(config.unlabelled), config.text_column) if config.unlabelled
                 else np.array([], dtype=object))
    if len(from_file) != len(plan.file_kept):
        raise UserError(f"{config.unlabelled} is not the file the chief read: start every worker again")
    kept = np.flatnonzero(plan.file_kept)
    unlabelled = UnlabelledTexts(np.concatenate([own[:], from_file[kept]]), {"from_file": len(from_file)},
                                 np.concatenate([np.arange(len(own)), len(own) + kept]))
    labelled = np.flatnonzero((codes >= 1) & (codes <= 3))
    data = LoadedData(stored.take(labelled), labels[labelled], label_set(record["classes"], record["chosen_by"]),
                      rows_read=rows.rows_read, unlabelled=own, file_starts=np.array(rows.file_starts, np.int64))
    return data, splits, unlabelled


# ----------------------------------------------------------------------------------------------------------
# Functions that live inside the saved model file
# ----------------------------------------------------------------------------------------------------------


def remove_markup(text):
    """HTML tags such as IMDB's <br /> replaced by a space (all that BERT's inputs lose before its own tokenizer)."""
    return tf.strings.regex_replace(text, r"<[^>]*>", " ")


@keras.saving.register_keras_serializable(package="sentiment_analysis")
def standardize_text(text):
    """Lowercase, remove HTML tags such as <br />, keep ! and ? as words, and drop other punctuation."""
    text = remove_markup(tf.strings.lower(text, encoding="utf-8"))
    text = tf.strings.regex_replace(text, r"'", "")
    text = tf.strings.regex_replace(text, r"([!?])", r" \1 ")
    return tf.strings.regex_replace(text, r"[^\p{L}\p{N}!?]+", " ")


def blend_probabilities(weight: float, neural, baseline):
    """The blend: weight * neural + (1 - weight) * baseline. Works on NumPy arrays and on Keras tensors alike,
    so the reported blend and the saved one are the same formula."""
    return weight * neural + (1 - weight) * baseline


# ----------------------------------------------------------------------------------------------------------
# The script's own Keras layers, saved inside the model file. Registered with Keras' serialization registry, so
# that `import sentiment_analysis` is all keras.models.load_model needs to find them by their saved names.
# ----------------------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="sentiment_analysis")
class TfidfLogistic(keras.layers.Layer):
    """Scores like the fitted baseline. Input: n-gram ids from a TextVectorization layer whose vocabulary is the
    baseline's (0 is padding, 1 is out of vocabulary). Output: the logistic regression's probabilities, computed as
    scikit-learn does: (1 + log count) * idf, L2-normalized per review, dot the coefficients, plus the intercept;
    a sigmoid for two classes (one column), a softmax for more."""

    def __init__(self, num_ids, outputs=1, **kwargs):
        super().__init__(**kwargs)
        self.num_ids, self.outputs = num_ids, outputs
        per_class = () if outputs == 1 else (outputs,)
        self.idf = self.add_weight(shape=(num_ids,), initializer="zeros", trainable=False, name="idf")
        self.coef = self.add_weight(shape=(num_ids, *per_class), initializer="zeros", trainable=False,
                                    name="coef")
        self.intercept = self.add_weight(shape=per_class, initializer="zeros", trainable=False,
                                         name="intercept")

    def ngram_weights(self, ids):
        """The TF-IDF of a batch of n-gram ids, the one place it is computed (the explanations use it too): each
        distinct (review, n-gram) pair in order of first occurrence, as its review, its n-gram id and its weight
        (1 + log count) * idf, and each review's L2 norm of those weights."""
        # Count each (review, n-gram) pair: one key per pair, counted with unique_with_counts.
        ids = tf.cast(ids, "int64")
        batch = tf.shape(ids)[0]
        rows = tf.repeat(tf.range(batch, dtype="int64"), tf.shape(ids)[1])
        flat = tf.reshape(ids, [-1])
        known = flat > 1
        keys = tf.boolean_mask(rows, known) * self.num_ids + tf.boolean_mask(flat, known)
        unique_keys, _, counts = tf.unique_with_counts(keys)
        review, ngram = unique_keys // self.num_ids, unique_keys % self.num_ids
        weights = (1.0 + tf.math.log(tf.cast(counts, "float32"))) * tf.gather(self.idf, ngram)
        return review, ngram, weights, tf.sqrt(tf.math.unsorted_segment_sum(weights**2, review, batch))

    def call(self, ids):
        batch = tf.shape(ids)[0]
        review, ngram, weights, norms = self.ngram_weights(ids)
        if self.outputs == 1:
            scores = tf.math.unsorted_segment_sum(weights * tf.gather(self.coef, ngram), review, batch)
            return tf.sigmoid(scores / tf.maximum(norms, 1e-12) + self.intercept)[:, None]
        scores = tf.math.unsorted_segment_sum(weights[:, None] * tf.gather(self.coef, ngram), review, batch)
        return tf.nn.softmax(scores / tf.maximum(norms, 1e-12)[:, None] + self.intercept)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.outputs)

    def get_config(self):
        return {**super().get_config(), "num_ids": self.num_ids, "outputs": self.outputs}


@keras.saving.register_keras_serializable(package="sentiment_analysis")
class ClassNames(keras.layers.Layer):
    """Passes the probabilities through unchanged and keeps the class names in the model file, so that predict
    needs nothing else, and the training settings, so that the file says how it was made."""

    def __init__(self, names, settings=None, **kwargs):
        super().__init__(**kwargs)
        self.names, self.settings = list(names), settings

    def call(self, probabilities):
        return probabilities

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "names": self.names, "settings": self.settings}


@keras.saving.register_keras_serializable(package="sentiment_analysis")
class WeightedBlend(keras.layers.Layer):
    """Mixes the neural model's and the baseline's probabilities, keeping its weight in the file (for --explain)."""

    def __init__(self, weight, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)

    def call(self, inputs):
        neural, baseline = inputs
        return blend_probabilities(self.weight, neural, baseline)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


class SubwordVectorizer(keras.layers.Layer):
    """What the two subword vectorizers share: a vocabulary of pieces, an output of sequence_length token ids per
    text, tokenizers made whole in __init__, and the cleaning of text into words (`standardize`: what
    WordPiece splits; for BERT, whose tokenizer cleans text its own way, the words the baseline and the
    explanations read)."""
    standardize = staticmethod(standardize_text)

    def __init__(self, vocabulary, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary, self.sequence_length = list(vocabulary), sequence_length

    def build(self, input_shape=None):
        pass  # The tokenizers are made whole in __init__.

    def get_vocabulary(self):
        return list(self.vocabulary)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.sequence_length)

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.vocabulary, "sequence_length": self.sequence_length}


@keras.saving.register_keras_serializable(package="sentiment_analysis")
class WordPieceVectorizer(SubwordVectorizer):
    """--tokenizer wordpiece: what TextVectorization does for words. Standardize, split into WordPiece subword
    tokens of its vocabulary (KerasHub's WordPieceTokenizer; 0 is padding), pad or cut to sequence_length."""

    def __init__(self, vocabulary, sequence_length, **kwargs):
        super().__init__(vocabulary, sequence_length, **kwargs)
        self.tokenizer, self.uncut = (keras_hub.tokenizers.WordPieceTokenizer(
            vocabulary=self.vocabulary, sequence_length=length, lowercase=False, strip_accents=False,
            oov_token="[UNK]", dtype="int32") for length in (sequence_length, None))

    def call(self, texts):
        return self.tokenizer(self.standardize(tf.reshape(texts, [-1])))

    def token_counts(self, texts):
        """Tokens per text before the cut to sequence_length."""
        return np.array([len(row) for row in self.uncut(self.standardize(tf.reshape(texts, [-1])))])


@keras.saving.register_keras_serializable(package="sentiment_analysis")
class BertVectorizer(SubwordVectorizer):
    """--arch bert: text prepared as a BERT checkpoint's own tokenizer does (KerasHub's BertTokenizer with the
    checkpoint's vocabulary, lowercasing and accent rule; punctuation marks become tokens), after removing HTML
    tags such as <br />: [CLS] pieces [SEP], cut to sequence_length, then [PAD]."""

    def __init__(self, vocabulary, sequence_length, lowercase=True, strip_accents=True, **kwargs):
        super().__init__(vocabulary, sequence_length, **kwargs)
        self.lowercase, self.strip_accents = bool(lowercase), bool(strip_accents)
        self.tokenizer = keras_hub.models.BertTokenizer(vocabulary=self.vocabulary, lowercase=self.lowercase,
                                                        strip_accents=self.strip_accents, dtype="int32")
        self.start_id, self.end_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        self.packer = keras_hub.layers.StartEndPacker(sequence_length, start_value=self.start_id,
                                                      end_value=self.end_id,
                                                      pad_value=self.tokenizer.pad_token_id)

    def pieces(self, texts):
        pieces = self.tokenizer(remove_markup(tf.reshape(texts, [-1])))
        if isinstance(pieces, list):  # eager KerasHub gives Python lists for ragged output
            pieces = tf.ragged.constant(pieces, dtype=tf.int32, ragged_rank=1, inner_shape=())
        return pieces

    def call(self, texts):
        return self.packer(self.pieces(texts))

    def token_counts(self, texts):
        """Tokens per text before the cut to sequence_length, [CLS] and [SEP] included."""
        return np.array([len(row) + 2 for row in self.pieces(texts)])

    def words(self, text) -> list[str]:
        """The words of a text as this tokenizer splits it (punctuation marks are words), pieces joined."""
        words = []
        for piece in (self.vocabulary[i] for i in np.asarray(self.pieces(tf.constant([str(text)]))[0])):
            if piece.startswith("##") and words:
                words[-1] += piece[2:]
            else:
                words.append(piece)
        return words

    def get_config(self):
        return {**super().get_config(), "lowercase": self.lowercase, "strip_accents": self.strip_accents}


# ----------------------------------------------------------------------------------------------------------
# Text to tokens. The tokenizer lives inside the saved model, so training and prediction share it.
# ----------------------------------------------------------------------------------------------------------


def text_standardizer(vectorizer):
    """How a model's vectorizer cleans text into words: the one function the baseline (fitted beside it and
    exported into the blend), the truncation count and the explanations read text with. A TextVectorization
    holds it in its config; the script's subword vectorizers as `standardize`."""
    standardize = (vectorizer.get_config()["standardize"] if isinstance(vectorizer, layers.TextVectorization)
                   else getattr(vectorizer, "standardize", None))
    if not callable(standardize):
        raise UserError(f"the model's vectorizer cleans text with {standardize!r}, which this script does not know; "
                        "train the model with this script")
    return standardize


def text_batches(texts, batch_size: int = 2048, progress: StageProgress | None = None):
    """Batches of tf.string, `progress` told of each. (NumPy's astype(str) would make a fixed-width array as
    wide as the longest review: gigabytes for IMDB.) A plain generator wherever the batches are used as they come:
    in TensorFlow 2.21 eager mode, tf.data's from_generator keeps its generator, and whatever that holds, until the
    process ends (tensorflow/tensorflow#57690): the 2M-row run's chunks of decoded texts stayed, about 1 GB."""
    for start in range(0, len(texts), batch_size):
        yield tf.constant([str(text) for text in texts[start:start + batch_size]])
        if progress:
            progress(min(start + batch_size, len(texts)))


def text_dataset(texts, batch_size: int = 2048, progress: StageProgress | None = None):
    """text_batches as a tf.data.Dataset (what a vectorizer's adapt() takes): it keeps `texts` to the end (above),
    so give it views (Texts) or a bounded sample, not decoded texts by the million."""
    return tf.data.Dataset.from_generator(lambda: text_batches(texts, batch_size, progress),
                                          output_signature=tf.TensorSpec((None,), tf.string))


@dataclass(frozen=True)
class BertCheckpoint:
    """The BERT checkpoint that --bert-preset names, read before any data: its tokenizer's vocabulary and text
    rules, and the shape of its backbone (the position table bounds --max-length)."""
    preset: str
    source: str                  # a Hugging Face checkpoint directory, a KerasHub preset directory or name
    vocabulary: tuple[str, ...]
    lowercase: bool
    strip_accents: bool
    positions: int               # the most tokens it takes, [CLS] and [SEP] included
    layers: int
    hidden_size: int
    parameters: int

    def description(self) -> dict:
        """Where a run started from, for metrics.json and the saved model."""
        return {"bert_checkpoint": self.preset, "format": self.source, "layers": self.layers,
                "hidden_size": self.hidden_size, "positions": self.positions, "parameters": self.parameters,
                "vocabulary": len(self.vocabulary), "lowercase": self.lowercase, "strip_accents": self.strip_accents}


def read_json_file(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {one_line(error, 120)}") from None
    if not isinstance(content, dict):
        raise UserError(f"cannot read {path}: not a JSON object")
    return content


def is_hugging_face_checkpoint(preset: str) -> bool:
    """A directory as Hugging Face's save_pretrained writes it: a config.json with a model_type."""
    config = Path(preset) / "config.json"
    return config.is_file() and "model_type" in read_json_file(config)


def hugging_face_tokenizer(directory: Path) -> tuple[list[str], bool, bool]:
    """The WordPiece vocabulary of a Hugging Face BERT checkpoint (vocab.txt, or the vocabulary inside
    tokenizer.json), and whether its tokenizer lowercases and strips accents (Hugging Face's BertTokenizer:
    do_lower_case, by default true; strip_accents unset follows lowercasing)."""
    config_file = directory / "tokenizer_config.json"
    settings = read_json_file(config_file) if config_file.is_file() else {}
    lowercase, strip_accents = settings.get("do_lower_case", True), settings.get("strip_accents")
    if (directory / "vocab.txt").is_file():
        vocabulary = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")
        while vocabulary and not vocabulary[-1]:
            vocabulary.pop()
    elif (directory / "tokenizer.json").is_file():
        spec = read_json_file(directory / "tokenizer.json")
        model = spec.get("model") or {}
        if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            raise UserError(f"--bert-preset {directory}: its tokenizer.json is a {model.get('type')} tokenizer, not "
                            "BERT's WordPiece")
        by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
        if [index for _, index in by_id] != list(range(len(by_id))):
            raise UserError(f"--bert-preset {directory}: the ids of its tokenizer.json vocabulary have gaps")
        vocabulary = [token for token, _ in by_id]
        normalizer = spec.get("normalizer") or {}
        if normalizer.get("type") == "BertNormalizer":
            lowercase = normalizer.get("lowercase", lowercase)
            strip_accents = normalizer.get("strip_accents", strip_accents)
    else:
        raise UserError(f"--bert-preset {directory}: a Hugging Face checkpoint needs its vocab.txt or tokenizer.json")
    return vocabulary, bool(lowercase), bool(lowercase if strip_accents is None else strip_accents)


@functools.cache
def load_bert_checkpoint(preset: str) -> BertCheckpoint:
    """What the run needs to know of a BERT checkpoint before reading data (its backbone is built without its
    weights here; build_bert_classifier loads them). A one-line error if it cannot be had or does not fit."""
    hugging_face = Path(preset).is_dir() and is_hugging_face_checkpoint(preset)
    try:
        backbone = keras_hub.models.BertBackbone.from_preset(preset, load_weights=False)
        if not hugging_face:
            tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
    except UserError:
        raise
    except Exception as error:  # KerasHub raises many types for a missing, foreign or unreachable preset.
        raise UserError(f"cannot load the BERT preset {preset!r}: {one_line(error, 200)}") from None
    if hugging_face:
        weights = Path(preset) / "model.safetensors"
        try:  # its header only: the weights are read when the model is built
            with safetensors.safe_open(str(weights), framework="np") as handle:
                handle.keys()
        except Exception as error:  # missing, not a safetensors file, truncated
            raise UserError(f"--bert-preset {preset}: cannot read {weights.name} ({one_line(error, 120)}); a Hugging "
                            "Face checkpoint needs its weights as model.safetensors") from None
        vocabulary, lowercase, strip_accents = hugging_face_tokenizer(Path(preset))
        source = "Hugging Face checkpoint directory"
    else:
        vocabulary, lowercase = tokenizer.get_vocabulary(), tokenizer.lowercase
        strip_accents = tokenizer.strip_accents
        source = "KerasHub preset directory" if Path(preset).is_dir() else "KerasHub preset"
    missing = [token for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if token not in vocabulary]
    if missing:
        raise UserError(f"--bert-preset {preset}: its vocabulary lacks {', '.join(missing)}; is it a BERT tokenizer?")
    if vocabulary[0] != "[PAD]":
        raise UserError(f"--bert-preset {preset}: its vocabulary must start with [PAD] (id 0, the padding here), "
                        f"not {vocabulary[0]!r}")
    if len(vocabulary) > backbone.vocabulary_size:
        raise UserError(f"--bert-preset {preset}: its tokenizer has {len(vocabulary)} pieces but its model embeds "
                        f"only {backbone.vocabulary_size}")
    checkpoint = BertCheckpoint(preset, source, tuple(vocabulary), bool(lowercase), bool(strip_accents),
                                int(backbone.max_sequence_length), int(backbone.num_layers),
                                int(backbone.hidden_dim), int(backbone.count_params()))
    del backbone
    return checkpoint


@dataclass(frozen=True)
class ModelRecipe:
    """The flags an --arch record builds its model and tokenizer from (ARCHITECTURES)."""
    arch: str
    units: int
    layers: int
    spatial_dropout: float
    tokenizer: str
    vocab_size: int
    max_length: int
    bert_preset: str

    @classmethod
    def of(cls, config: TrainConfig) -> "ModelRecipe":
        return cls(config.arch, config.units, config.layers, config.spatial_dropout, config.tokenizer,
                   config.vocab_size, config.max_length, config.bert_preset)


def fit_max_length_to_bert(recipe: ModelRecipe) -> int:
    """--max-length within the checkpoint's position table: BERT's default length is cut to the table, with a
    line that says so; a longer length given on purpose is a one-line error naming both numbers."""
    bert_preset, max_length = recipe.bert_preset, recipe.max_length
    checkpoint = load_bert_checkpoint(bert_preset)
    print(f"BERT checkpoint {bert_preset} ({checkpoint.source}): {checkpoint.layers} layers, hidden size "
          f"{checkpoint.hidden_size}, {checkpoint.parameters / 1e6:.1f}M parameters, {checkpoint.positions} "
          f"positions, a vocabulary of {len(checkpoint.vocabulary)} pieces"
          f"{', lowercased' if checkpoint.lowercase else ''}")
    if max_length <= checkpoint.positions:
        return max_length
    if max_length == BERT_DEFAULTS["max_length"]:
        print(f"Note: the checkpoint has {checkpoint.positions} positions, fewer than BERT's default --max-length "
              f"{max_length}: texts are cut to {checkpoint.positions} tokens")
        return checkpoint.positions
    raise UserError(f"--max-length {max_length} is longer than the {checkpoint.positions} positions of the "
                    f"BERT checkpoint {bert_preset}: give --max-length {checkpoint.positions} or less")


def word_vectorizer(vocab_size: int, max_length: int):
    return layers.TextVectorization(max_tokens=vocab_size, standardize=standardize_text,
                                    output_sequence_length=max_length, name="vectorizer")


def learned_vectorizer(texts, recipe: ModelRecipe, max_length: int, vocabulary: list[str] | None = None):
    """The recurrent models' tokenizer, learned on the training texts (or made again from the `vocabulary` it
    learned, for the cache of token ids), as a layer from strings to token ids that pads or cuts every review to
    max_length (the run's, Derived): a TextVectorization of the --vocab-size most frequent words, or with
    --tokenizer wordpiece a WordPiece vocabulary of about --vocab-size subword pieces."""
    progress = StageProgress("vocabulary: ", len(texts), "texts")
    if recipe.tokenizer == "word":
        vectorizer = word_vectorizer(recipe.vocab_size, max_length)
        if vocabulary is None:
            vectorizer.adapt(text_dataset(texts, progress=progress))
        else:
            vectorizer.set_vocabulary(vocabulary)
        progress.close()
        return vectorizer
    if vocabulary is None:
        print("Learning a WordPiece vocabulary on the training split ...")
        vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
            text_dataset(texts, progress=progress).unbatch().map(WordPieceVectorizer.standardize),
            recipe.vocab_size, lowercase=False, strip_accents=False, reserved_tokens=["[PAD]", "[UNK]"])
        progress.close()
    return WordPieceVectorizer(vocabulary, max_length, name="vectorizer")


def checkpoint_vectorizer(texts, recipe: ModelRecipe, max_length: int, vocabulary: list[str] | None = None):
    """BERT's tokenizer: the checkpoint's own WordPiece vocabulary and rules (nothing is learned from texts)."""
    checkpoint = load_bert_checkpoint(recipe.bert_preset)
    return BertVectorizer(checkpoint.vocabulary, max_length, checkpoint.lowercase, checkpoint.strip_accents,
                          name="vectorizer")


def checkpoint_start(recipe: ModelRecipe) -> dict:
    """What a BERT model starts from, for metrics.json and the saved model."""
    return load_bert_checkpoint(recipe.bert_preset).description()


TOKEN_CHUNK = 1 << 22  # token ids counted at a time (16 MB)


@dataclass(frozen=True)
class ReviewIds:
    """The token ids of some reviews without their right padding, as fairseq stores them: every review's ids one
    after another in `tokens` (int32) and where each review ends in `ends` (int64), so review i is
    tokens[ends[i - 1]:ends[i]]. At IMDB's lengths under half the padded (reviews, max_length) array. `tokens`
    is a NumPy array in memory or a FileArray of a file (read where used). `max_length` is the longest a review
    was cut to."""
    tokens: np.ndarray
    ends: np.ndarray
    max_length: int

    @classmethod
    def from_padded(cls, padded: np.ndarray) -> ReviewIds:
        """From right-padded ids (a vectorizer's output): each row's ids up to its last non-zero one."""
        padded = np.asarray(padded, dtype=np.int32)
        nonzero = padded != 0
        lengths = np.where(nonzero.any(axis=1), padded.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
        return cls.from_lengths(padded[np.arange(padded.shape[1]) < lengths[:, None]], lengths, padded.shape[1])

    @classmethod
    def from_lengths(cls, tokens: np.ndarray, lengths: np.ndarray, max_length: int) -> ReviewIds:
        return cls(np.asarray(tokens, dtype=np.int32), np.cumsum(lengths, dtype=np.int64), max_length)

    @classmethod
    def concatenate(cls, parts: list[ReviewIds], max_length: int) -> ReviewIds:
        return cls.from_lengths(np.concatenate([np.zeros(0, np.int32)] + [part.tokens for part in parts]),
                                np.concatenate([np.zeros(0, np.int64)] + [part.lengths for part in parts]),
                                max_length)

    def __len__(self) -> int:
        return len(self.ends)

    def __eq__(self, other) -> bool:
        return (isinstance(other, ReviewIds) and self.max_length == other.max_length
                and np.array_equal(self.ends, other.ends) and np.array_equal(self.tokens[:], other.tokens[:]))

    @functools.cached_property
    def starts(self) -> np.ndarray:
        return self.ends - self.lengths

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Tokens in each review (0 for an empty one)."""
        return np.diff(self.ends, prepend=0)

    def __iter__(self):
        """Each review's ids."""
        return (self.tokens[start:end] for start, end in zip(self.starts, self.ends))

    def take(self, rows: np.ndarray) -> ReviewIds:
        """These reviews, in this order (from a file, one read each)."""
        starts, lengths = self.starts[rows], self.lengths[rows]
        if isinstance(self.tokens, FileArray):
            tokens = np.concatenate([np.zeros(0, np.int32)] + [self.tokens[start:start + length] for start, length
                                                              in zip(starts.tolist(), lengths.tolist())])
        else:
            tokens = self.tokens[np.repeat(starts - np.cumsum(lengths) + lengths, lengths) +
                                 np.arange(int(lengths.sum()))]
        return ReviewIds.from_lengths(tokens, lengths, self.max_length)

    def id_counts(self, minlength: int = 0) -> np.ndarray:
        """How often each id occurs (np.bincount of all the tokens), read TOKEN_CHUNK ids at a time."""
        counts = np.zeros(minlength, np.int64)
        for start in range(0, len(self.tokens), TOKEN_CHUNK):
            chunk = np.bincount(self.tokens[start:start + TOKEN_CHUNK])
            counts = np.pad(counts, (0, max(0, len(chunk) - len(counts))))
            counts[:len(chunk)] += chunk
        return counts

    @staticmethod
    @contextlib.contextmanager
    def writer(path: Path):
        """Yield a function that appends reviews' ids (a ReviewIds) to the file `path` as they come: its tokens
        raw int32, then, when all are written, each review's length in PATH.lengths.npy (ReviewIds.open)."""
        lengths = []
        with _atomic_path(path) as temporary, open(temporary, "wb") as file:
            yield lambda part: (file.write(part.tokens.tobytes()), lengths.append(part.lengths))
        with _atomic_path(path.with_name(path.name + ".lengths.npy")) as temporary, open(temporary, "wb") as file:
            np.save(file, np.concatenate([np.zeros(0, np.int64)] + lengths))

    @classmethod
    def open(cls, path: Path, max_length: int) -> ReviewIds:
        """The ids a writer wrote to `path`, read from the file where used (FileArray), not held in memory."""
        lengths = np.load(path.with_name(path.name + ".lengths.npy"))
        if path.stat().st_size != 4 * int(lengths.sum()):
            raise ValueError(f"{path.name} does not hold the ids its lengths count")
        return cls(FileArray(path, np.int32), np.cumsum(lengths, dtype=np.int64), max_length)

    def padded(self, rows: np.ndarray, width: int | None = None) -> np.ndarray:
        """These reviews right-padded with zeros to `width` columns (default: the longest of them, at least 1;
        none is longer than `width`)."""
        part = self.take(rows)
        padded = np.zeros((len(part), width or max(1, int(part.lengths.max(initial=0)))), dtype=np.int32)
        padded[np.arange(padded.shape[1]) < part.lengths[:, None]] = part.tokens
        return padded


@dataclass(frozen=True)
class ChosenReviews:
    """Some reviews of several ReviewIds read one after the other as one: `rows` numbers them all in turn (the
    first's, then the second's ...). Iterated, each review's ids are read when used, so a pass over millions
    (Word2Vec's) holds none of them."""
    parts: list
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        offset = 0
        for part in self.parts:
            rows = self.rows[(self.rows >= offset) & (self.rows < offset + len(part))] - offset
            for first in range(0, len(rows), 65536):  # the places of 65,536 reviews at a time
                chunk = rows[first:first + 65536]
                for start, end in zip(part.starts[chunk].tolist(), part.ends[chunk].tolist()):
                    yield part.tokens[start:end]
            offset += len(part)


def vectorize(vectorizer, texts, max_length: int, into: Path | None = None) -> ReviewIds:
    """The texts' token ids, batch by batch without their padding (the padded array of all texts never exists).
    With `into`, each batch is written to that file as it comes, and the ids are read from there (ReviewIds.open)."""
    progress, parts, done = StageProgress("tokenizing: ", len(texts), "texts"), [], 0
    with ReviewIds.writer(into) if into else contextlib.nullcontext(parts.append) as keep:
        for batch in text_batches(texts):
            part = ReviewIds.from_padded(vectorizer(batch))
            keep(part)
            done += len(part)
            progress(done)
    progress.close()
    return ReviewIds.open(into, max_length) if into else ReviewIds.concatenate(parts, max_length)


def review_lengths(token_ids: ReviewIds) -> np.ndarray:
    """Tokens per review (at least 1: an empty review still takes one step)."""
    return np.maximum(token_ids.lengths, 1)


def bucket_boundaries(max_length: int, rows: int, batch_size: int) -> list[int]:
    """Length limits for batching reviews of similar length, so little time goes into padding: 20 buckets, or
    fewer when there are too few rows to fill a batch in each (each bucket ends with a partial batch, which
    several replicas pad to a whole one)."""
    buckets = min(20, max(1, rows // batch_size))
    step = max(1, max_length // buckets)
    return list(range(step, max_length, step)) or [max_length]


def count_batches(lengths: np.ndarray, batch_size: int, boundaries: list[int]) -> int:
    """How many batches bucket_by_sequence_length makes from these lengths (for the learning-rate schedule)."""
    buckets = np.bincount(np.searchsorted(boundaries, lengths, side="right"))
    return int(sum(math.ceil(count / batch_size) for count in buckets))


def weighted_batch(token_ids, labels, full_size: int | None):
    """Add a weight to each review of a batch: 1 for a real review, 0 for padding. With `full_size`, a partial
    batch is filled up to that size with copies of its own reviews at weight 0, so that it splits evenly across
    replicas; the weighted loss and metrics then count every real review once and the copies not at all."""

    if full_size is None:
        return token_ids, labels, tf.ones(tf.shape(labels)[:1])
    real = tf.shape(labels)[0]
    rows = tf.range(full_size) % real
    weights = tf.cast(tf.range(full_size) < real, tf.float32)
    return tf.gather(token_ids, rows), tf.gather(labels, rows), weights


def length_batches(lengths: np.ndarray, batch_size: int, boundaries: list[int], order: np.ndarray) -> list:
    """The batches tf.data's bucket_by_sequence_length makes, in NumPy (its full batches in its order; a test
    checks it): the reviews taken in `order`, each into the bucket of its length (count_batches' buckets); a
    bucket's batch leaves when it is full, and at the end each bucket's partial batch, bucket by bucket. The
    batches (arrays of review indices) in the order they leave."""
    bucket_of = np.searchsorted(boundaries, lengths[order], side="right")
    leaving = []
    for bucket in np.unique(bucket_of):
        positions = np.flatnonzero(bucket_of == bucket)  # where in `order` this bucket's reviews come
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            leaves = chunk[-1] if len(chunk) == batch_size else len(order) + bucket  # partial ones at the end
            leaving.append((leaves, order[chunk]))
    return [chunk for _, chunk in sorted(leaving, key=lambda pair: pair[0])]


def build_training_dataset(token_ids: ReviewIds, labels, batch_size: int, shuffle_seed: int | None,
                           pad_to_full_batches: bool = False):
    """Batches of similar-length reviews, padded on the right only as far as the longest in the batch, as (token
    ids, labels, weights): the reviews shuffled with `shuffle_seed` (none: in their order), then grouped by
    length (length_batches). Only the batch being made is read from `token_ids`, so memory does not grow with
    the rows when they are read from a file (ReviewIds.open).

    Every review is in exactly one batch. On several replicas (`pad_to_full_batches`) each bucket's last,
    partial batch is filled up to a whole one with weight-0 copies, so every batch splits evenly across them.
    In a cluster every worker builds the same batches in the same order (same data, same seed) and keeps its
    replicas' share of each one (tf.data's DATA auto-sharding): every worker then runs the same number of steps,
    which the collective gradient sums need.

    Training builds one such dataset per epoch, shuffled with a seed of that epoch's own, so that a resumed
    run sees the same batches as one that was never interrupted."""

    labels = np.asarray(labels)  # as given, no float copy: from_generator keeps what its function holds (text_batches)
    boundaries = bucket_boundaries(token_ids.max_length, len(labels), batch_size)

    def padded_batches():  # the epoch's order and batches are made here, so they go when the epoch ends
        order = (np.random.default_rng(shuffle_seed).permutation(len(labels)) if shuffle_seed is not None
                 else np.arange(len(labels)))
        for rows in length_batches(review_lengths(token_ids), batch_size, boundaries, order):
            yield token_ids.padded(rows), labels[rows].astype(np.float32)

    signature = (tf.TensorSpec(shape=(None, None), dtype=tf.int32),
                 tf.TensorSpec(shape=(None, *labels.shape[1:]), dtype=tf.float32))
    dataset = tf.data.Dataset.from_generator(padded_batches, output_signature=signature)
    full_size = batch_size if pad_to_full_batches else None
    dataset = dataset.map(lambda ids, labels: weighted_batch(ids, labels, full_size))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # tf.data's autotuning runs beside the training step and, on two cores, made about half the epochs 1.35x
    # slower (docs/RESULTS.md, issue 44); without it every epoch runs at the fast pace.
    options.autotune.enabled = False
    # The number of batches is known up front: the loop runs exactly that many steps on every worker.
    steps = count_batches(review_lengths(token_ids), batch_size, boundaries)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps)).with_options(options).prefetch(
        tf.data.AUTOTUNE)


def epoch_batches(token_ids: ReviewIds, labels, global_batch_size: int, seed: int, several: bool):
    """epoch -> that epoch's training batches, shuffled with a seed of its own (so a resumed run sees the same)."""
    return lambda epoch: build_training_dataset(token_ids, labels, global_batch_size, seed + epoch, several)


def by_length(token_ids: ReviewIds) -> np.ndarray:
    """The reviews' order from shortest to longest (ties in input order): batches of it need little padding."""
    return np.argsort(token_ids.lengths, kind="stable")


def build_inference_dataset(token_ids: ReviewIds, batch_size: int):
    """Batches of the reviews in by_length's order, each padded to its longest review. The order is made when
    the batches are read, so that from_generator, which keeps its function to the end (text_batches), keeps no
    array of the rows."""

    def batches():
        order = by_length(token_ids)
        for start in range(0, len(order), batch_size):
            yield token_ids.padded(order[start:start + batch_size])

    signature = tf.TensorSpec(shape=(None, None), dtype=tf.int32)
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(len(token_ids) / batch_size)))


def class_columns(output):
    """The one place where the card's Dense(1, sigmoid) becomes (reviews, classes): its (reviews, 1) probability
    of the positive class p becomes the two columns [1 - p, p]; a softmax's output stays as it is. For NumPy
    arrays and, in a graph (serving, explanations), for tensors alike."""
    if output.shape[-1] != 1:
        return output
    if isinstance(output, np.ndarray):
        return np.concatenate([1 - output, output], axis=1)
    return tf.concat([1 - output, output], axis=1)


def class_probabilities(model_output) -> np.ndarray:
    """(reviews, classes) float64 probabilities from a model's output (class_columns)."""
    return class_columns(np.asarray(model_output, dtype=np.float64).reshape(len(model_output), -1))


class PredictionProgress(keras.callbacks.Callback):
    """Progress lines (StageProgress) while Keras' predict() goes through its batches."""

    def __init__(self, reviews: int, batch_size: int):
        super().__init__()
        self.progress, self.batch_size = StageProgress("predicting: ", reviews, "reviews", one="review"), batch_size

    def on_predict_batch_end(self, batch, logs=None):
        self.progress(min((batch + 1) * self.batch_size, self.progress.total))

    def on_predict_end(self, logs=None):
        self.progress.close()


def predict_token_ids(classifier, token_ids: ReviewIds, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (reviews, classes) in input order; sorting by length first keeps padding small."""
    sorted_probabilities = class_probabilities(
        classifier.predict(build_inference_dataset(token_ids, batch_size), verbose=0,
                           callbacks=[PredictionProgress(len(token_ids), batch_size)]))
    probabilities = np.empty_like(sorted_probabilities)
    probabilities[by_length(token_ids)] = sorted_probabilities
    return probabilities


def count_truncated(vectorizer, texts, max_length: int) -> int:
    """How many texts have more than max_length tokens, so that the model saw only their first max_length."""
    standardize = text_standardizer(vectorizer)

    def token_counts(batch):
        if hasattr(vectorizer, "token_counts"):  # subword pieces
            return vectorizer.token_counts(batch)
        return tf.strings.split(standardize(batch)).row_lengths()  # words, as TextVectorization splits

    progress = StageProgress("counting the reviews cut: ", len(texts), "texts")
    cut = int(sum(int(tf.reduce_sum(tf.cast(token_counts(batch) > max_length, tf.int32)))
                  for batch in text_batches(texts, progress=progress)))
    progress.close()
    return cut


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def word_vector_file_header(path: Path) -> list[str]:
    """The first line of a word-vector file (gzipped or not), split on spaces; a one-line error if unreadable."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            return file.readline(1_000_000).decode("utf-8").split()
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise UserError(f"cannot read the word-vector file {path}: {error}") from None


def word_vector_file_dimension(path: Path) -> int:
    """The vector size of a word-vector file, from its first line: 'WORDS SIZE' in word2vec and fastText
    files (text or binary), else a GloVe line 'word v1 v2 ...'. A one-line error if it is neither."""
    first = word_vector_file_header(path)
    if len(first) == 2 and all(part.isdigit() for part in first):
        return int(first[1])
    try:
        [float(value) for value in first[1:]]
    except ValueError:
        first = []
    if len(first) < 2:
        raise UserError(f"{path} is not a word-vector file (GloVe text, word2vec text or binary, or fastText .vec)")
    return len(first) - 1


def fetch_word_vectors(name: str) -> str:
    """--embeddings NAME (no such file): the word-vector file of that name from gensim's downloader, which fetches
    it once from the internet and keeps it in ~/gensim-data (GENSIM_DATA_DIR), as a path; a file or a method
    (word2vec, random) as it is."""
    if name in EMBEDDING_METHODS or Path(name).is_file():
        return name
    print(f"Word vectors {name}: from gensim's downloader (fetched once, then kept in {gensim.downloader.BASE_DIR})")
    try:
        path = gensim.downloader.load(name, return_path=True)
    except ValueError:
        raise UserError(f"--embeddings {name} is neither a file nor a name gensim's downloader knows (python -m "
                        "gensim.downloader --info lists its names)") from None
    except Exception as error:  # no network, a proxy, a full disk: gensim raises all sorts
        raise UserError(f"--embeddings {name}: gensim's downloader could not fetch it ({type(error).__name__}: "
                        f"{one_line(error, 120)}); download the vectors and give the file instead") from None
    if not Path(path).is_file():
        raise UserError(f"--embeddings {name}: gensim's downloader gave no file ({path})")
    return str(path)


def resolve_embedding_dim(embedding_dim: int | None, embeddings: str) -> int:
    """The embedding's size: a word-vector file's own, else --embedding-dim or 128."""
    if embeddings in EMBEDDING_METHODS:
        return embedding_dim or DEFAULT_EMBEDDING_DIM
    size = word_vector_file_dimension(Path(embeddings))
    if embedding_dim not in (None, size):
        raise UserError(f"--embedding-dim {embedding_dim} conflicts with the vectors of {embeddings}, "
                        f"which have {size} dimensions (leave --embedding-dim out)")
    return size


@dataclass(frozen=True)
class Derived:
    """What the run works out from the flags before it reads any data, kept apart from what the user gave
    (TrainConfig, never rebound). The training plan, worked out from the data, is TrainingPlan."""
    embeddings: str     # --embeddings, a downloader's name replaced by the file it fetched
    embedding_dim: int  # the embedding's size: a word-vector file's own, else --embedding-dim or 128
    max_length: int     # the length texts are padded or cut to: --max-length, within a BERT checkpoint's positions

    @classmethod
    def of(cls, config: TrainConfig, architecture) -> "Derived":
        """`architecture`: the --arch record (ARCHITECTURES), which fits the length to its inputs."""
        embeddings = fetch_word_vectors(config.embeddings)
        return cls(embeddings, resolve_embedding_dim(config.embedding_dim, embeddings),
                   architecture.max_length(ModelRecipe.of(config)))


def run_settings(config: TrainConfig, derived: Derived) -> dict:
    """The flags with the derived values in their place: what metrics.json and the saved model record."""
    return {**dataclasses.asdict(config), **dataclasses.asdict(derived)}


def training_fingerprint(config: TrainConfig, derived: Derived, files: list[Path] | None = None) -> dict:
    """The settings that shape training (the derived values in place of the flags) and a digest of the bytes of
    the data (`files` of --data: those this process reads), which a resumed run must share with the run that
    saved the state (and its cache of token ids)."""
    settings = run_settings(config, derived)
    files = data_files(config.data) if files is None else files
    return {**{spec.name: settings[spec.name] for spec in dataclasses.fields(config)
               if spec.metadata["shapes_training"]}, "data_digest": data_digest(files, config.unlabelled)}


def word2vec_matrix(token_ids, vocabulary: list[str], embedding_dim: int, seed: int, epochs: int = 5) -> np.ndarray:
    """Train gensim Word2Vec (`epochs` passes) on the training reviews and return it as an embedding matrix for
    `vocabulary`."""

    words = np.array(vocabulary, dtype=object)
    # gensim reads the texts once to count the words, then once a pass: progress in texts read, so a long pass
    # is not a long silence.
    progress, read = StageProgress("Word2Vec: ", (epochs + 1) * len(token_ids), "texts read", one="text read"), [0]

    class Sentences:  # read again on each pass, so the words of every text are never in memory at once
        def __iter__(self):
            for row in token_ids:
                read[0] += 1
                if read[0] % 1000 == 0:
                    progress(read[0])
                yield list(words[row[row > 1]])

    # One worker thread and a hash that does not change between Python processes make it repeatable.
    model = Word2Vec(Sentences(), vector_size=embedding_dim, window=5, min_count=1, sg=0, epochs=epochs,
                     seed=seed, workers=1, hashfxn=stable_hash)
    progress.close()
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0, 0.05, size=(len(vocabulary), embedding_dim)).astype(np.float32)
    matrix[0] = 0.0
    for index, word in enumerate(vocabulary):
        if index > 1 and word in model.wv:
            matrix[index] = model.wv[word]
    return matrix


def load_word_vectors(path: Path):
    """A word-vector file as gensim KeyedVectors: GloVe text (no header line), word2vec text or binary, or
    fastText .vec (text with a header line). A file with a header is read as text, then as binary (first as
    binary when its name ends in .bin)."""

    attempts = [dict(binary=False, no_header=True)]
    if len(word_vector_file_header(path)) == 2:
        attempts = [dict(binary=False), dict(binary=True)]
        if ".bin" in path.suffixes:
            attempts.reverse()
    errors = []
    for options in attempts:
        try:
            return KeyedVectors.load_word2vec_format(str(path), **options)
        except (ValueError, UnicodeDecodeError, EOFError, OSError, IndexError) as error:
            errors.append(str(error).splitlines()[0][:150] if str(error) else type(error).__name__)
    raise UserError(f"cannot read word vectors from {path}: {errors[0]}")


def pretrained_matrix(vectors, token_ids, vocabulary: list[str], seed: int) -> tuple[np.ndarray, dict]:
    """The embedding matrix for `vocabulary` from a file's vectors; words the file lacks start random, at the
    file's own scale. Also how much of the vocabulary and of the training tokens the file covered."""
    found = [index for index, word in enumerate(vocabulary) if index > 1 and word in vectors.key_to_index]
    known = np.array([vectors[vocabulary[index]] for index in found], dtype=np.float32)
    scale = float(known.std()) if len(found) else 0.05
    matrix = np.random.default_rng(seed).normal(0, scale, (len(vocabulary), vectors.vector_size)).astype(np.float32)
    matrix[0] = 0.0
    if found:
        matrix[found] = known
    tokens = token_ids.id_counts(len(vocabulary))
    tokens[0] = 0  # [UNK] (1) counts as not covered
    coverage = {"file_words": len(vectors.key_to_index), "dimension": vectors.vector_size,
                "vocabulary_covered": round(len(found) / max(1, len(vocabulary) - 2), 4),
                "training_tokens_covered": round(float(tokens[found].sum() / max(1, tokens.sum())), 4)}
    return matrix, coverage


# ----------------------------------------------------------------------------------------------------------
# The training plan: how many steps a run takes, decided by the size of the data (explicit flags win)
# ----------------------------------------------------------------------------------------------------------

# The card's batch of 128 and a patience of one epoch suit the full IMDB data (about 290 steps an epoch). A
# small training split gets batches of SMALL_BATCH_SIZE and enough epochs for at least MIN_STEPS optimizer
# steps, with the learning rate's cosine decay spread over all of them, and a patience of at least
# PATIENCE_STEPS steps, so that early stopping does not end a run during its first noisy epochs. Word2Vec,
# whose vectors start the embedding, passes over the training text until it has seen WORD2VEC_TOKENS tokens
# (5 passes at least, as on the full data): with 5 passes over a few thousand reviews most of its vectors
# stay near their tiny random start and the LSTM starts worse than from random vectors. On large data its passes
# are bounded by WORD2VEC_MAX_TOKENS instead (fewer passes, then a seeded sample of the texts: about 155 s of
# Word2Vec on machine D beside the baseline's fits, 0.65 million tokens a second). The numbers were chosen on
# validation figures of IMDB subsets (docs/RESULTS.md, "Small data").
BATCH_SIZE = 128
SMALL_BATCH_SIZE = 32
SMALL_TRAINING_ROWS = 20_000  # fewer training reviews than this: batches of SMALL_BATCH_SIZE
MIN_STEPS = 1000
PATIENCE_STEPS = 250
MAX_PLANNED_EPOCHS = 100
WORD2VEC_EPOCHS = 5
WORD2VEC_TOKENS = 20_000_000
MAX_WORD2VEC_EPOCHS = 200
WORD2VEC_MAX_TOKENS = 100_000_000


@dataclass(frozen=True)
class TrainingPlan:
    batch_size: int       # per replica
    steps_per_epoch: int  # batches of the training split in one epoch (all replicas together)
    epochs: int           # at most; early stopping may end the run sooner
    patience: int         # epochs without a lower validation loss before stopping
    word2vec_epochs: int  # passes of Word2Vec over the training text (0 without --embeddings word2vec)
    reason: str           # how the plan came about, in words
    word2vec_share: float = 1.0  # of the texts Word2Vec reads (a seeded sample when they are too many)

    @property
    def planned_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def summary(self) -> dict:
        return {"batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch, "planned_epochs": self.epochs,
                "planned_steps": self.planned_steps, "patience": self.patience,
                "word2vec_epochs": self.word2vec_epochs, "word2vec_share": self.word2vec_share, "plan": self.reason}


@dataclass(frozen=True)
class PlanAsked:
    """What the flags fix of a plan (None: planned by the rule above), and whether Word2Vec runs."""
    batch_size: int | None
    epochs: int | None
    min_epochs: int
    patience: int | None
    word2vec: bool

    @classmethod
    def of(cls, config: TrainConfig) -> PlanAsked:
        return cls(config.batch_size, config.epochs, config.min_epochs, config.patience,
                   config.embeddings == "word2vec")


def plan_training(asked: PlanAsked, lengths: np.ndarray, replicas: int, max_length: int,
                  other_tokens: int = 0) -> TrainingPlan:
    """The batch size, epochs, patience and Word2Vec passes of a run on training reviews of these token counts
    (padded or cut to max_length; and `other_tokens` of unlabelled text that Word2Vec also learns from): the values
    given as flags, and for the rest the rule above. (Several replicas take --batch-size each.)"""
    rows, notes = len(lengths), []
    batch_size = asked.batch_size
    if batch_size is None:
        batch_size = SMALL_BATCH_SIZE if rows < SMALL_TRAINING_ROWS else BATCH_SIZE
        if batch_size != BATCH_SIZE:
            notes.append(f"batches of {batch_size} for {rows} training reviews (fewer than {SMALL_TRAINING_ROWS})")
    global_batch = batch_size * replicas
    steps = count_batches(lengths, global_batch, bucket_boundaries(max_length, rows, global_batch))
    epochs = asked.epochs
    if epochs is None:
        epochs = min(MAX_PLANNED_EPOCHS, max(asked.min_epochs, math.ceil(MIN_STEPS / steps)))
        if epochs == MAX_PLANNED_EPOCHS:
            notes.append(f"{epochs} epochs, the most planned")
        elif epochs > asked.min_epochs:
            notes.append(f"{epochs} epochs to reach about {MIN_STEPS} optimizer steps")
    else:
        notes.append(f"{epochs} epochs as given")
    patience = asked.patience
    if patience is None:
        patience = min(epochs, max(1, math.ceil(PATIENCE_STEPS / steps)))
        if patience > 1:
            notes.append(f"patience {patience} epochs (about {PATIENCE_STEPS} steps)")
    tokens = int(lengths.sum()) + other_tokens
    word2vec_epochs = 0  # no Word2Vec in this run
    share = 1.0
    if asked.word2vec:
        word2vec_epochs = min(MAX_WORD2VEC_EPOCHS, max(WORD2VEC_EPOCHS, math.ceil(WORD2VEC_TOKENS / max(1, tokens))))
        if word2vec_epochs * tokens > WORD2VEC_MAX_TOKENS:
            word2vec_epochs = max(1, WORD2VEC_MAX_TOKENS // tokens)
            share = min(1.0, WORD2VEC_MAX_TOKENS / (word2vec_epochs * tokens))
            sample = "" if share == 1.0 else f"a {share:.0%} sample of "
            notes.append(f"Word2Vec {word2vec_epochs} passes over {sample}{tokens} tokens (at most "
                         f"{WORD2VEC_MAX_TOKENS} in all)")
    if word2vec_epochs > WORD2VEC_EPOCHS:
        notes.append(f"Word2Vec {word2vec_epochs} passes over {tokens} tokens")
    reason = "; ".join(notes) or f"the defaults for {rows} training reviews"
    return TrainingPlan(batch_size, steps, epochs, patience, word2vec_epochs, reason, share)


class Background:
    """A function run on a thread of its own while the run goes on (Word2Vec, in C, beside the baseline's fits
    in other processes); `result` waits for it and gives its value, or raises its error. A daemon thread, so
    Ctrl-C is not held up by it. `Background.done(value)` is one already finished."""

    def __init__(self, function=None, *args):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self.run, args=(function, args), daemon=True) if function else None
        if self.thread:
            self.thread.start()

    @classmethod
    def done(cls, value) -> Background:
        finished = cls()
        finished.value = value
        return finished

    def run(self, function, args) -> None:
        try:
            self.value = function(*args)
        except BaseException as error:  # handed to the caller of result()
            self.error = error

    def result(self):
        if self.thread:
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True)
class DataShare:
    """Which training texts this process learns from. Alone, or in a cluster given one file: all of them, every
    worker making the same batches and taking its replicas' part of each (tf.data's DATA auto-sharding). A cluster
    given several files (a directory or glob): worker i of n trains on the texts of files i, i + n, ... in name
    order (`file_starts`: where each file's texts begin in the text store), so that tokenizing the training
    split, the baseline and the teacher, and the epochs are divided among the workers. The epochs' validation
    check and the unlabelled text (its rows of --data by file, the --unlabelled file's rows i, i + n, ...) are
    divided the same way, each worker scoring or learning from its own part.

    Only the chief reads every file: it splits the data as one process would (the split ranks each class's rows
    by their keys over all files) and tells the others each of their texts' fate (WorkersPlan), so that they
    read only their own files; it scores the whole validation and test splits after training. What must be
    equal across the workers comes from sums over the cluster (`strategy`): the plan (every worker's review
    lengths), an epoch's steps (the most any worker has; one with fewer adds batches of weight 0), the validation
    figures (every worker's sums), the class weights, and from the chief the vocabulary (learned from a seeded
    sample of the whole training split and unlabelled text) and the starting embedding (Word2Vec trains there
    alone)."""
    worker: int = 0
    workers: int = 1
    file_starts: np.ndarray | None = None  # None: every training text is this process's
    strategy: object = None

    @classmethod
    def of(cls, role: ClusterRole | None, several_files: bool, file_starts: np.ndarray, strategy) -> DataShare:
        """A cluster's worker given a directory or glob of files trains on its own (set_up_run has checked that
        there are at least as many files as workers); otherwise every process on all the training texts."""
        if role is None or not several_files:
            return cls(strategy=strategy)
        return cls(role.index, role.workers, file_starts, strategy)

    @classmethod
    def before_reading(cls, role: ClusterRole | None, data: str, strategy) -> DataShare:
        """The share of a process that has not read the data yet (file_starts: one 0 per file, until read)."""
        return cls.of(role, several_files(data), np.zeros(len(data_files(data)), np.int64), strategy)

    @property
    def divided(self) -> bool:
        return self.file_starts is not None

    @property
    def takes_chiefs(self) -> bool:
        """Whether what the chief makes for everyone (the starting embedding) replaces this worker's own."""
        return self.divided and self.worker != 0

    def files(self) -> list[int]:
        """This worker's files, numbered from 0 in name order."""
        return list(range(self.worker, len(self.file_starts), self.workers))

    def from_chief(self, values: np.ndarray | None = None, dtype=np.int64) -> np.ndarray:
        """The chief's int64 `values` on every worker (the others give none): its length, then the values."""
        if not self.divided:
            return values
        size = int(self.summed(np.array([0 if values is None else len(values)], np.int64), chief_only=True)[0])
        return self.summed(np.zeros(size, dtype) if values is None else np.asarray(values, dtype), chief_only=True)

    def json_from_chief(self, value=None):
        """The chief's `value` (of JSON's kinds) on every worker (the others give None)."""
        if not self.divided:
            return value
        sent = None if self.worker else np.frombuffer(json.dumps(value).encode(), np.uint8)
        return json.loads(self.from_chief(sent, np.int32).astype(np.uint8).tobytes())

    def plan_from_chief(self, plan: WorkersPlan | None = None) -> WorkersPlan:
        """WorkersPlan from the chief to every worker of a divided cluster."""
        return WorkersPlan(self.json_from_chief(plan and plan.record), self.from_chief(plan and plan.fates),
                           self.from_chief(plan and plan.file_kept))

    def owns(self, texts: Texts) -> np.ndarray:
        """Which of these texts (a view of the text store) came from this worker's files."""
        if not self.divided:
            return np.ones(len(texts), dtype=bool)
        return (np.searchsorted(self.file_starts, texts.starts, side="right") - 1) % self.workers == self.worker

    def summed(self, values: np.ndarray, chief_only: bool = False) -> np.ndarray:
        """`values` added up over the workers (only the chief's with `chief_only`: the chief's values on every
        worker), as float64 for sums of counts, in the dtype given for a chief's values."""
        if not self.divided:
            return values
        values = np.asarray(values, dtype=values.dtype if chief_only else np.float64)
        local = self.strategy.num_replicas_in_sync // self.workers
        keep = (lambda replica: replica == 0) if chief_only else (lambda replica: replica % local == 0)

        def one_copy():  # each worker's values once (the first of its replicas), or the chief's alone
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return tf.where(keep(replica), tf.constant(values), tf.zeros_like(tf.constant(values)))

        return self.strategy.reduce("SUM", self.strategy.run(one_copy), axis=None).numpy()

    def lengths(self, lengths: np.ndarray, longest: int) -> np.ndarray:
        """Every worker's review lengths (at most `longest`), for a plan that is the same on all of them: the
        cluster's counts of each length, as lengths in increasing order."""
        if not self.divided:
            return lengths
        counts = self.summed(np.bincount(lengths, minlength=longest + 1)).astype(np.int64)
        return np.repeat(np.arange(len(counts)), counts)

    def most(self, value: int) -> int:
        """The largest of the workers' values (an epoch's steps)."""
        if not self.divided:
            return value
        each = np.zeros(self.workers)
        each[self.worker] = value
        return int(self.summed(each).max())

    def plan(self, asked: PlanAsked, train_ids: ReviewIds, unlabelled_ids: ReviewIds, replicas: int,
             max_length: int) -> TrainingPlan:
        """plan_training of the whole training split (every worker's review lengths), and divided, with the steps
        of an epoch on the busiest worker: its own reviews in batches of the plan's size per replica, its
        replicas' at a step."""
        lengths = review_lengths(train_ids)
        plan = plan_training(asked, self.lengths(lengths, max_length), replicas, max_length,
                             int(review_lengths(unlabelled_ids).sum()))
        if not self.divided:
            return plan
        replicas = self.strategy.num_replicas_in_sync // self.workers
        steps = math.ceil(count_batches(lengths, plan.batch_size, bucket_boundaries(max_length, len(lengths),
                                                                                      plan.batch_size)) / replicas)
        return dataclasses.replace(plan, steps_per_epoch=self.most(steps))

    def epoch_batches(self, token_ids: ReviewIds, labels, plan: TrainingPlan, seed: int):
        """epoch -> that epoch's training batches (epoch_batches). Divided: this worker's own reviews in batches of
        the plan's size per replica, then batches of weight 0 up to the plan's steps for each of its replicas, so
        every worker runs the same steps (the loss divides by the real reviews of all replicas: weight-0
        reviews change nothing)."""
        replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
        if not self.divided:
            return epoch_batches(token_ids, labels, plan.batch_size * replicas, seed, replicas > 1)
        elements = plan.steps_per_epoch * replicas // self.workers
        return lambda epoch: self.padded(build_training_dataset(token_ids, labels, plan.batch_size, seed + epoch,
                                                                pad_to_full_batches=True), elements)

    def padded(self, own, elements: int):
        """This worker's batches (one replica's each) and then batches of weight 0, `elements` in all."""
        _, labels, weights = own.element_spec
        size = weights.shape[0] or 1
        empty = (tf.zeros((size, 1), tf.int32), tf.zeros((size, *labels.shape[1:])), tf.zeros((size,)))
        padding = tf.data.Dataset.from_tensors(empty).repeat(elements - int(own.cardinality()))
        return own.concatenate(padding).apply(tf.data.experimental.assert_cardinality(elements))

    def validation_batches(self, validation_ids: ReviewIds, texts: Texts, labels, batch_size: int, replicas: int):
        """The validation split's batches for the epochs' check (in their order), and how many steps they take.
        Divided: this worker's own rows (those of its files) in batches of one replica's, then batches of weight
        0 up to the busiest worker's steps: the cluster's sums make the whole split's figures on every worker."""
        if not self.divided:
            batches = build_training_dataset(validation_ids, labels, batch_size * replicas, None, replicas > 1)
            return batches, int(batches.cardinality())
        rows, local = np.flatnonzero(self.owns(texts)), replicas // self.workers
        own = build_training_dataset(validation_ids.take(rows), np.asarray(labels)[rows], batch_size, None, True)
        steps = self.most(math.ceil(int(own.cardinality()) / local))
        return self.padded(own, steps * local), steps

    def distribute(self, strategy, dataset, skip: int):
        """A dataset of training batches spread over the replicas, its first `skip` steps left out."""
        if not self.divided:
            return strategy.experimental_distribute_dataset(dataset.skip(skip))
        dataset = dataset.skip(skip * (strategy.num_replicas_in_sync // self.workers))
        return strategy.distribute_datasets_from_function(lambda _: dataset)

    def restrict(self, splits: DataSplits, unlabelled: UnlabelledTexts, data: LoadedData,
                 training_rows: int) -> tuple[DataSplits, UnlabelledTexts]:
        """The splits with only this worker's training texts and its part of the unlabelled texts (data: where
        they came from), said in a line (`training_rows`: the cluster's)."""
        if not self.divided:
            return splits, unlabelled
        owned, numbers = self.owns(splits.train.texts), ", ".join(str(number + 1) for number in self.files())
        if not owned.any():
            raise UserError(f"worker {self.worker + 1} of {self.workers} has no training rows: its files "
                            f"({numbers}) are empty or unread (--max-rows)")
        own_unlabelled = np.concatenate([self.owns(data.unlabelled), np.arange(unlabelled.counts["from_file"])
                                         % self.workers == self.worker])[unlabelled.sources]
        also = f" and {int(own_unlabelled.sum())} unlabelled texts" if len(own_unlabelled) else ""
        print(f"This worker trains on its share: {int(owned.sum())} of the {training_rows} training rows{also}, from "
              f"files {numbers} of {len(self.file_starts)} (each worker its own; the chief scores validation and "
              "test whole)")
        rows = np.flatnonzero(owned)
        return (dataclasses.replace(splits, train=LabelledTexts(splits.train.texts.take(rows), splits.train.labels[rows])),
                dataclasses.replace(unlabelled, texts=unlabelled.texts[own_unlabelled],
                                    sources=unlabelled.sources[own_unlabelled]))


@dataclass
class PreparedInputs:
    """What the training loop and the scoring need from the text, made once from the splits."""
    vectorizer: object          # the adapted keras TextVectorization layer
    vocabulary: list[str]
    train_ids: ReviewIds        # token ids of each split, cut to --max-length
    validation_ids: ReviewIds
    test_ids: ReviewIds
    unlabelled_ids: ReviewIds   # token ids of the unlabelled texts the run learns from (maybe none)
    plan: TrainingPlan          # batch size, steps per epoch, epochs and patience
    training_batches: object    # epoch -> that epoch's training batches (a tf.data.Dataset), in its own order
    validation_batches: object  # a tf.data.Dataset, the same every epoch
    validation_steps: int
    embedding_start: Background          # gives the embedding's starting weights and a file's coverage
    class_weights: np.ndarray | None     # loss weight of each class (None: all 1)
    truncated_reviews: int               # reviews longer than --max-length tokens, in all splits
    notes: list[str]                     # advice about the data, for the run's output and the report
    from_cache: bool = False             # made by an interrupted run with the same data and settings
    share: DataShare = field(default_factory=lambda: DataShare())  # whose training batches (a cluster's part)

    @property
    def embedding_matrix(self) -> np.ndarray | None:
        """The embedding's starting weights (None: random), once made (Word2Vec trains in the background)."""
        return self.embedding_start.result()[0]

    @property
    def embedding_coverage(self) -> dict | None:
        """With a word-vector file: how much of the text it covered."""
        return self.embedding_start.result()[1]

    def counts(self) -> dict:
        """What the report adds to the data's counts: reviews cut, and a word-vector file's coverage."""
        coverage = {"embedding_coverage": self.embedding_coverage} if self.embedding_coverage else {}
        return {"longer_than_max_length": self.truncated_reviews, **coverage}


def unsplit_texts(token_ids: ReviewIds) -> int:
    """How many texts are one or two tokens that no other text shares (or [UNK]): what text without spaces
    (Chinese, Japanese, Thai) becomes when it is split into words at spaces, a sentence per "word"."""
    short = token_ids.padded(np.flatnonzero(token_ids.lengths <= 2), width=2)  # 0: no second token
    if not len(short):
        return 0
    counts = token_ids.id_counts(2)
    lonely = (counts[short] <= 1) | (short <= 1)  # used by no other text, [UNK] (1) or padding (0)
    return int(np.all(lonely, axis=1).sum())


def check_texts_split(train_ids: ReviewIds, tokenizer: str) -> None:
    """Stop before training when most training texts were not split into tokens: such a model learns chance."""
    unsplit = unsplit_texts(train_ids)
    if unsplit > len(train_ids) / 2:
        hint = ("try --tokenizer wordpiece, whose pieces split Chinese characters and long words"
                if tokenizer == "word" else "split the text into words (with spaces) before training")
        raise UserError(f"{unsplit} of {len(train_ids)} training texts are one or two tokens that no other text "
                        f"shares: text without spaces between words (Chinese, Japanese, Thai) is read as one word "
                        f"per sentence, and a model of such words learns nothing; {hint}")


def starting_embedding(derived: Derived, seed: int, train_ids: ReviewIds, unlabelled_ids: ReviewIds,
                       vocabulary: list[str], plan: TrainingPlan):
    """The embedding's starting weights and, from a word-vector file, how much of the text it covers: Word2Vec
    trained on the training split and the unlabelled text (--embeddings word2vec), the file's vectors, or
    (None, None) for random."""
    if derived.embeddings == "word2vec":
        also = f" and {len(unlabelled_ids)} unlabelled texts" if len(unlabelled_ids) else ""
        print(f"Training Word2Vec on the training split{also} ({plan.word2vec_epochs} passes) ...")
        texts, chosen = len(train_ids) + len(unlabelled_ids), slice(None)
        if plan.word2vec_share < 1.0:  # too many tokens for its budget: a seeded sample of the texts
            chosen = np.sort(np.random.default_rng(seed).choice(texts, round(plan.word2vec_share * texts),
                                                                replace=False))
        sentences = ChosenReviews([train_ids, unlabelled_ids], np.arange(texts)[chosen])
        return word2vec_matrix(sentences, vocabulary, derived.embedding_dim, seed, plan.word2vec_epochs), None
    if derived.embeddings == "random":
        return None, None
    print(f"Reading word vectors from {derived.embeddings} ...")
    matrix, coverage = pretrained_matrix(load_word_vectors(Path(derived.embeddings)), train_ids, vocabulary, seed)
    print(f"The file covers {coverage['vocabulary_covered']:.1%} of the vocabulary and "
          f"{coverage['training_tokens_covered']:.1%} of the training tokens; the rest start random")
    return matrix, coverage


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's "balanced" class weights: rows / (classes * rows of the class), from the training split's
    rows of each class."""
    weights = (counts.sum() / (len(counts) * np.maximum(counts, 1))).astype(np.float32)
    print("Class weights: " + ", ".join(f"{weight:.3f}" for weight in weights))
    return weights


def small_data_notes(pretrained: bool, embeddings: str, training_rows: int, unlabelled_texts: int = 0) -> list[str]:
    """Advice for a small training split whose embedding starts from nothing pretrained (Word2Vec learns from the
    unlabelled texts too, so they count for it)."""
    texts = training_rows + (unlabelled_texts if embeddings == "word2vec" else 0)
    if embeddings not in EMBEDDING_METHODS or texts >= SMALL_TRAINING_ROWS or pretrained:
        return []
    start = "Word2Vec vectors learned on" if embeddings == "word2vec" else "random vectors, with"
    what = f"{texts} texts" if texts > training_rows else f"{training_rows} training texts"
    return [f"Small data: the embedding starts from {start} only {what}. Pretrained word "
            "vectors help most here: --embeddings glove-wiki-gigaword-100 (gensim downloads it once), or "
            "--embeddings FILE with a GloVe, word2vec or fastText file."]


# The directory of the InputsCache under the run's training state directory, and the token ids it keeps.
INPUTS_CACHE = "inputs_cache"
VOCABULARY_TEXTS = 200_000  # the most texts the tokenizer learns its vocabulary from (a seeded sample of more)
CACHED_IDS = ("train_ids", "validation_ids", "test_ids", "unlabelled_ids")


@dataclass(frozen=True)
class InputsCache:
    """The run's token ids on disk, in `directory` under its state directory: each split's ids written there as
    they are tokenized and read from there where used (ReviewIds.open), so memory does not hold them; with
    them the vocabulary, and once made the starting embedding. The same command resumes from it without
    tokenizing (or Word2Vec) again. Keyed on the run's training_fingerprint and the number of unlabelled texts;
    each part counts only once its record is written (inputs.json, embedding.json); its bytes are counted by the
    free-space check before they are written; removed with the state when the run ends."""
    directory: Path
    key: dict

    @classmethod
    def of(cls, directory: Path, fingerprint: dict, unlabelled_texts: int) -> InputsCache:
        return cls(directory, {**fingerprint, "unlabelled_texts": unlabelled_texts})

    def start(self, texts: list, max_length: int) -> None:
        """An empty cache (whatever was there removed), once the ids of these texts fit on the disk: at most
        max_length ids a text and one per character (and two more: BERT's markers), int32, and a length each. A
        Texts' byte lengths bound its characters, so its texts are not decoded to count them."""
        needed = sum(int(np.minimum(max_length, (part.ends - part.starts if isinstance(part, Texts) else
                                                 np.fromiter(map(len, part), np.int64, len(part))) + 2).sum()) * 4
                     + 8 * len(part) for part in texts)
        _check_free_space(next(path for path in self.directory.parents if path.exists()), needed)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        """The cache gone, and the state directory with it if nothing else is there."""
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.parent.rmdir()

    def ids_file(self, name: str) -> Path:
        return self.directory / f"{name}.int32"

    def save_ids(self, vocabulary, truncated_reviews: int) -> None:
        record = {"key": self.key, "vocabulary": [str(word) for word in vocabulary],
                  "truncated_reviews": truncated_reviews}
        _write_text(self.directory / "inputs.json", json.dumps(record))

    def embedding_bytes(self, inputs: PreparedInputs) -> int:
        """What save_embedding writes: the starting weights, unless they were read from here."""
        saved = (self.directory / "embedding.json").is_file() or inputs.embedding_matrix is None
        return 0 if saved else inputs.embedding_matrix.nbytes

    def save_embedding(self, inputs: PreparedInputs) -> None:
        if (self.directory / "embedding.json").is_file():
            return
        if inputs.embedding_matrix is not None:
            with _atomic_path(self.directory / "embedding.npy") as temporary, open(temporary, "wb") as file:
                np.save(file, inputs.embedding_matrix)
        record = {"matrix": inputs.embedding_matrix is not None, "coverage": inputs.embedding_coverage}
        _write_text(self.directory / "embedding.json", json.dumps(record))

    def load(self, max_length: int) -> dict | None:
        """The cached inputs (the starting embedding among them if it was saved), else None (a cache of other
        data or settings, or one that cannot be read, is made again)."""
        if not (self.directory / "inputs.json").is_file():
            return None
        try:
            record = json.loads((self.directory / "inputs.json").read_text(encoding="utf-8"))
            if record["key"] != json.loads(json.dumps(self.key)):
                print("The cached token ids were made from other data or settings: preparing them again")
                return None
            cached = {name: ReviewIds.open(self.ids_file(name), max_length) for name in CACHED_IDS}
            if (self.directory / "embedding.json").is_file():
                embedding = json.loads((self.directory / "embedding.json").read_text(encoding="utf-8"))
                matrix = np.load(self.directory / "embedding.npy") if embedding["matrix"] else None
                cached["embedding"] = (matrix, embedding["coverage"])
        except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
            print(f"The cached token ids in {self.directory} cannot be read ({type(error).__name__}): preparing "
                  "them again")
            return None
        what = "token ids, vocabulary and starting embedding" if "embedding" in cached else "token ids and vocabulary"
        print(f"Reusing the {what} cached in {self.directory} by the interrupted run")
        return {**cached, "vocabulary": record["vocabulary"], "truncated_reviews": record["truncated_reviews"]}


def vocabulary_texts(train_texts: Texts, unlabelled_texts, seed: int):
    """What the tokenizer learns its vocabulary from: the training split and the unlabelled texts, one after the
    other; of more than VOCABULARY_TEXTS, a seeded sample of that many (the words a vocabulary keeps are the
    frequent ones, which a sample finds: docs/RESULTS.md, "the vocabulary from a sample")."""
    rows = len(train_texts) + len(unlabelled_texts)
    if rows <= VOCABULARY_TEXTS:
        return ChainedTexts(train_texts, unlabelled_texts)
    print(f"Learning the vocabulary from a sample of {VOCABULARY_TEXTS} of the {rows} texts")
    chosen = np.sort(np.random.default_rng(seed).choice(rows, VOCABULARY_TEXTS, replace=False))
    inside = chosen < len(train_texts)
    return ChainedTexts(train_texts.take(chosen[inside]), unlabelled_texts[chosen[~inside] - len(train_texts)])


def tokenizer_and_vocabulary(recipe: ModelRecipe, architecture, max_length: int, whole: tuple, seed: int,
                             share: DataShare, cached: dict | None):
    """The tokenizer, learned on the whole training split and unlabelled texts (`whole`: every worker's; never
    on validation or test texts; vocabulary_texts), or made from the vocabulary an interrupted run `cached`; in
    a divided cluster the chief's, sent to the others (who keep their cache only if it has the same). Its
    vocabulary, and the cache if still good."""
    vectorizer = None
    if share.takes_chiefs:
        vocabulary = share.json_from_chief()
        cached = cached if cached and cached["vocabulary"] == vocabulary else None
    elif cached:
        vocabulary = cached["vocabulary"]
    else:
        vectorizer = architecture.vectorizer(vocabulary_texts(*whole, seed), recipe, max_length)
        vocabulary = vectorizer.get_vocabulary()
    if share.divided and not share.takes_chiefs:
        share.json_from_chief([str(word) for word in vocabulary])
    if vectorizer is None:
        vectorizer = architecture.vectorizer([], recipe, max_length, vocabulary)
    return vectorizer, vocabulary, cached


def tokenized_texts(vectorizer, splits: DataSplits, max_length: int, unlabelled_texts: np.ndarray,
                    cache: InputsCache | None) -> list[ReviewIds]:
    """The token ids of each split and of this process's unlabelled texts (CACHED_IDS' order), written into
    `cache` (if any) as they come."""
    texts = (splits.train.texts, splits.validation.texts, splits.test.texts, unlabelled_texts)
    if cache:
        cache.start(texts, max_length)
    return [vectorize(vectorizer, part, max_length, cache.ids_file(name) if cache else None)
            for name, part in zip(CACHED_IDS, texts)]


def say_inputs(vocabulary, unit: str, truncated: int, plan: TrainingPlan, max_length: int, notes: list[str]) -> None:
    print(f"Vocabulary {len(vocabulary)} {unit}; {truncated} reviews longer than {max_length} tokens are cut")
    print(f"Plan: {plan.epochs} epochs of {plan.steps_per_epoch} batches of {plan.batch_size} ({plan.planned_steps} "
          f"steps), patience {plan.patience} ({plan.reason})")
    for note in notes:
        print(f"Note: {note}")


def cut_reviews(vectorizer, splits: DataSplits, max_length: int, share: DataShare) -> int:
    """How many reviews of all splits are longer than max_length tokens (the training split's of every worker)."""
    in_training = share.summed(np.array([count_truncated(vectorizer, splits.train.texts, max_length)]))[0]
    return int(in_training) + sum(count_truncated(vectorizer, part.texts, max_length)
                            for part in (splits.validation, splits.test))


def prepare_inputs(splits: DataSplits, config: TrainConfig, architecture, derived: Derived, replicas: int,
                   num_classes: int, unlabelled_texts: np.ndarray | None = None,
                   cache: InputsCache | None = None, share: DataShare | None = None,
                   whole: tuple | None = None) -> PreparedInputs:
    """Everything training needs from the text: the --arch record's tokenizer and the token ids
    (tokenized_texts), the plan and the batches, the embedding's start, the class weights, and what to say about
    the data. With `cache`, what an interrupted run cached there is reused when the data and settings are the same.
    With a `share` of a cluster's texts (splits.train and unlabelled_texts: this worker's; `whole`: all the
    training and unlabelled texts), the vocabulary, the plan and the class weights are the whole split's
    (DataShare)."""
    share = share or DataShare()
    if unlabelled_texts is None:
        unlabelled_texts = np.array([], dtype=object)
    max_length = derived.max_length
    whole_train, whole_unlabelled = whole or (splits.train.texts, None)
    whole = whole_train, unlabelled_texts if whole_unlabelled is None else whole_unlabelled
    vectorizer, vocabulary, cached = tokenizer_and_vocabulary(ModelRecipe.of(config), architecture, max_length, whole,
                                                              config.seed, share, cache.load(max_length) if cache
                                                              else None)
    train_ids, validation_ids, test_ids, unlabelled_ids = (
        [cached[name] for name in CACHED_IDS] if cached else
        tokenized_texts(vectorizer, splits, max_length, unlabelled_texts, cache))
    check_texts_split(train_ids, config.tokenizer)
    plan = share.plan(PlanAsked.of(config), train_ids, unlabelled_ids, replicas, max_length)
    validation_batches, validation_steps = share.validation_batches(validation_ids, splits.validation.texts,
                                                                    splits.validation.labels, plan.batch_size, replicas)
    training_batches = share.epoch_batches(train_ids, splits.train.labels, plan, config.seed)
    if cached and "embedding" in cached:
        embedding_start = Background.done(cached["embedding"])
    elif share.takes_chiefs and derived.embeddings == "word2vec":  # the chief's Word2Vec replaces it: none here
        embedding_start = Background.done((np.zeros((len(vocabulary), derived.embedding_dim), np.float32), None))
    else:  # Word2Vec trains on its own thread while the rest is prepared (the baseline's fits among it)
        embedding_start = Background(starting_embedding, derived, config.seed, train_ids, unlabelled_ids,
                                     vocabulary, plan)
    if cached:
        truncated = cached["truncated_reviews"]
    else:
        truncated = cut_reviews(vectorizer, splits, max_length, share)
        if cache:
            cache.save_ids(vocabulary, truncated)
    class_weights = (balanced_class_weights(share.summed(np.bincount(splits.train.labels, minlength=num_classes)))
                     if config.class_weight == "balanced" else None)
    notes = small_data_notes(architecture.checkpoint is not None, derived.embeddings, len(train_ids),
                             len(unlabelled_ids))
    unit = "pieces" if isinstance(vectorizer, SubwordVectorizer) else "words"
    say_inputs(vocabulary, unit, truncated, plan, max_length, notes)
    return PreparedInputs(vectorizer, vocabulary, train_ids, validation_ids, test_ids, unlabelled_ids, plan,
                          training_batches, validation_batches, validation_steps,
                          embedding_start, class_weights, truncated, notes, from_cache=bool(cached), share=share)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


# The layer names the rest of the script relies on: the explanations find the token embedding and the output
# layer by them, and the neural model inside a saved file by its name's ending.
EMBEDDING_LAYER, OUTPUT_LAYER, CLASSIFIER_SUFFIX = "embedding", "probability", "_classifier"


def output_layer(num_classes: int):
    """The output layer of every model: Dense(1, sigmoid), the positive class's probability, for two classes;
    Dense(classes, softmax) for more. It stays float32 under mixed precision, for a sound sigmoid and loss."""
    units, activation = counted_classes(num_classes).output
    return layers.Dense(units, activation=activation, dtype="float32", name=OUTPUT_LAYER)


def build_recurrent_classifier(recipe: ModelRecipe, vocab_size: int, num_classes: int, embedding_dim: int):
    """Embedding -> SpatialDropout1D -> recurrent layer(s) (LSTM, Bidirectional LSTM or GRU) -> the output
    layer, on token ids (0 is padding)."""
    recurrent = layers.GRU if recipe.arch == "gru" else layers.LSTM
    inputs = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    # mask_zero lets the recurrent layer skip the right padding (and keeps cuDNN usable on a GPU).
    x = layers.Embedding(vocab_size, embedding_dim, mask_zero=True, name=EMBEDDING_LAYER)(inputs)
    x = layers.SpatialDropout1D(recipe.spatial_dropout)(x)
    for index in range(recipe.layers):
        layer = recurrent(recipe.units, return_sequences=index < recipe.layers - 1)
        x = layers.Bidirectional(layer)(x) if recipe.arch == "bilstm" else layer(x)
    return keras.Model(inputs, output_layer(num_classes)(x), name=recipe.arch + CLASSIFIER_SUFFIX)


def build_bert_classifier(recipe: ModelRecipe, vocab_size: int, num_classes: int, embedding_dim: int):
    """A pretrained BERT backbone on token ids ([CLS] ... [SEP], then 0 padding), its pooled [CLS] output ->
    Dropout(0.1) -> the output layer (KerasHub's BertTextClassifier's head). The vocabulary and the embedding's
    size are the checkpoint's."""
    try:
        backbone = keras_hub.models.BertBackbone.from_preset(recipe.bert_preset, name="bert_backbone")
    except Exception as error:  # e.g. a weights file that does not match its config
        raise UserError(f"cannot load the weights of the BERT preset {recipe.bert_preset!r}: "
                        f"{one_line(error, 200)}") from None
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    features = backbone({"token_ids": token_ids, "segment_ids": keras.ops.zeros_like(token_ids),
                         "padding_mask": keras.ops.not_equal(token_ids, 0)})
    x = layers.Dropout(0.1)(features["pooled_output"])
    return keras.Model(token_ids, output_layer(num_classes)(x), name="bert" + CLASSIFIER_SUFFIX)


def bert_backbone(classifier):
    """The KerasHub BertBackbone inside a classifier, or None."""
    return next((layer for layer in classifier.layers if hasattr(layer, "transformer_layers")), None)


def chain_explanation(classifier):
    """A classifier that is its token embedding and then layers each taking the output of the one before (every
    recurrent --arch), split for integrated gradients: the embedding, and a function from embedded tokens (no
    padding) to the output that replays the layers after it in order, at inference (no dropout)."""
    in_order = [layer for layer in classifier.layers if not isinstance(layer, keras.layers.InputLayer)]

    def rest(vectors):
        mask = tf.ones(tf.shape(vectors)[:2], dtype=tf.bool)
        x = vectors
        for layer in in_order[1:]:  # after the embedding
            recurrent = isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional))
            x = layer(x, mask=mask, training=False) if recurrent else layer(x, training=False)
        return x

    return classifier.get_layer(EMBEDDING_LAYER), rest


def bert_explanation(classifier):
    """BERT split for integrated gradients: KerasHub's BertBackbone's token embedding, then its steps after it
    (add the position and segment embeddings, normalize, the transformer layers, the pooled [CLS] output) and
    the classifier's head."""
    backbone = bert_backbone(classifier)

    def rest(vectors):
        shape = tf.shape(vectors)[:2]
        x = backbone.embeddings_add((vectors, backbone.position_embedding(vectors),
                                     backbone.segment_embedding(tf.zeros(shape, tf.int32))))
        x = backbone.embeddings_layer_norm(x)
        for layer in backbone.transformer_layers:
            x = layer(x, padding_mask=tf.ones(shape, tf.int32), training=False)
        x = backbone.pooled_dense(x[:, 0, :])
        return classifier.get_layer(OUTPUT_LAYER)(x)

    return backbone.token_embedding, rest


def given_max_length(recipe: ModelRecipe) -> int:
    return recipe.max_length


@dataclass(frozen=True)
class Architecture:
    """One --arch choice, everything the rest of the file knows of it:
    - `build`: (ModelRecipe, vocabulary size, classes, embedding size) -> a model from token ids to the output layer,
      its token embedding named EMBEDDING_LAYER, its name ending in CLASSIFIER_SUFFIX;
    - `explain`: the built classifier -> its token embedding layer and a function from embedded tokens to the
      output (predict --explain, the report), or None: its predictions cannot be explained word by word;
    - `vectorizer`: (training texts, ModelRecipe, max_length, a vocabulary to make it again from or None) ->
      its tokenizer layer from strings to token ids;
    - `max_length`: ModelRecipe -> the longest input, the length texts are padded or cut to;
    - `checkpoint`: ModelRecipe -> a description of the pretrained weights it starts from, or None: its embedding
      starts from word vectors (--embeddings) and small data gets advice;
    - `defaults`: its own defaults for flags the user did not give (config_from_args);
    - `op_threads`: the threads each TensorFlow op may use (intra-op), or None for TensorFlow's choice (one per
      core). A recurrent model's step is thousands of small ops one after another, which a second thread per op
      only slows: on a 2-core EPYC one thread each (and ops side by side on both cores) trained the default run in
      619 s instead of 861 (docs/RESULTS.md); BERT's large matrix products use every core."""
    build: object
    explain: object = None
    vectorizer: object = learned_vectorizer
    max_length: object = given_max_length
    checkpoint: object = None
    defaults: dict = field(default_factory=dict)
    op_threads: int | None = 1


# Every --arch choice. A new model is one Architecture here and its name in TrainConfig.arch; a model that is not
# a chain after its embedding (two branches joined, say) brings its own explain function, or None.
ARCHITECTURES = {"lstm": Architecture(build_recurrent_classifier, chain_explanation),
                 "bilstm": Architecture(build_recurrent_classifier, chain_explanation),
                 "gru": Architecture(build_recurrent_classifier, chain_explanation),
                 "bert": Architecture(build_bert_classifier, bert_explanation, checkpoint_vectorizer,
                                      fit_max_length_to_bert, checkpoint_start, BERT_DEFAULTS, op_threads=None)}


def build_classifier(config: TrainConfig, vocab_size: int, num_classes: int = 2, embedding_dim: int | None = None):
    """The --arch model on token ids, checked for the layer names the explanations and the report rely on. The
    embedding's size is the run's (Derived), by default --embedding-dim or a word-vector file's own."""
    if embedding_dim is None:
        embedding_dim = resolve_embedding_dim(config.embedding_dim, config.embeddings)
    classifier = ARCHITECTURES[config.arch].build(ModelRecipe.of(config), vocab_size, num_classes, embedding_dim)
    names = {layer.name for layer in classifier.layers}
    has_embedding = EMBEDDING_LAYER in names or any(hasattr(layer, "token_embedding") for layer in classifier.layers)
    if OUTPUT_LAYER not in names or not has_embedding or not classifier.name.endswith(CLASSIFIER_SUFFIX):
        raise ValueError(f"the {config.arch} model needs a layer {OUTPUT_LAYER!r}, a token embedding "
                         f"{EMBEDDING_LAYER!r} and a name ending in {CLASSIFIER_SUFFIX!r} (see ARCHITECTURES)")
    return classifier


@dataclass(frozen=True)
class OptimizerRecipe:
    learning_rate: float  # --learning-rate
    lr_schedule: str      # --lr-schedule
    weight_decay: float   # --weight-decay

    @classmethod
    def of(cls, config: TrainConfig) -> "OptimizerRecipe":
        return cls(config.learning_rate, config.lr_schedule, config.weight_decay)


def build_optimizer(recipe: OptimizerRecipe, plan: TrainingPlan):
    """Adam (AdamW with --weight-decay) from the recipe's learning rate, on --lr-schedule over the plan's
    steps."""
    learning_rate = recipe.learning_rate
    if recipe.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=max(1, plan.planned_steps), alpha=0.0)
    if recipe.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=recipe.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        # Scales the loss up so float16 gradients do not underflow (what Keras' compile() does by itself).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_model_and_optimizer(config: TrainConfig, inputs: PreparedInputs, num_classes: int, strategy,
                              embedding_dim: int):
    """The classifier with its starting embedding, and its optimizer, with their variables on the strategy's
    devices."""
    with strategy.scope():
        classifier = build_classifier(config, len(inputs.vocabulary), num_classes, embedding_dim)
        if inputs.embedding_matrix is not None:  # (in a cluster given several files, the chief's: DataShare)
            classifier.get_layer(EMBEDDING_LAYER).set_weights([inputs.share.summed(inputs.embedding_matrix,
                                                                                   chief_only=True)])
        optimizer = build_optimizer(OptimizerRecipe.of(config), inputs.plan)
        optimizer.build(classifier.trainable_variables)
    classifier.summary(print_fn=print)
    if ARCHITECTURES[config.arch].explain is None:
        print(f"Note: the {config.arch} model has no explain function (see ARCHITECTURES), so its predictions "
              "cannot be explained word by word (predict --explain, the report's mistakes)")
    return classifier, optimizer


def count_classes(classifier) -> int:
    """2 for a classifier with a sigmoid output, else the size of its softmax."""
    return max(2, classifier.get_layer(OUTPUT_LAYER).units)


def local_copy(classifier):
    """The trained classifier with plain variables on this machine, outside any distribution strategy: for
    scoring and saving, on the chief alone."""
    copy = keras.models.clone_model(classifier)
    copy.set_weights(classifier.get_weights())
    return copy


def build_predictor(vectorizer, classifier, class_names, settings: dict | None = None):
    """One model from raw strings to probabilities, the class names inside: the file is the whole predictor."""
    text = keras.Input(shape=(1,), dtype="string", name="text")
    probabilities = ClassNames(class_names, settings, name="class_names")(
        classifier(vectorizer(text)))
    return keras.Model(text, probabilities, name="sentiment_model")


def write_saved_model(model, directory: Path, class_names) -> None:
    """Write `model` as a TensorFlow SavedModel for serving (TensorFlow Serving, or tf.saved_model.load). Its
    serving_default signature takes `texts`, a 1-D string tensor of raw texts, and returns `probabilities`
    (texts, classes) in the order of `class_names`, and `label`, each text's predicted class name. The text
    cleaning, the tokenizer and (in a blend) the baseline are inside the graph: nothing else is needed."""

    names = tf.constant(list(class_names))

    def serve(texts):
        probabilities = class_columns(model(tf.reshape(texts, (-1, 1)), training=False))
        predicted = label_set(class_names).decide_tensor(probabilities)
        return {"probabilities": probabilities, "label": tf.gather(names, predicted)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve,
                         input_signature=[tf.TensorSpec(shape=(None,), dtype=tf.string, name="texts")])
    with _atomic_directory(directory) as temporary, contextlib.redirect_stdout(sys.stderr):
        archive.write_out(str(temporary), verbose=False)


# ----------------------------------------------------------------------------------------------------------
# Baseline: TF-IDF of word unigrams and bigrams with logistic regression; and its blend with the neural model
# ----------------------------------------------------------------------------------------------------------


def standardized_strings(texts, standardize) -> list[str]:
    """The model's own cleaning of text (`text_standardizer` of its vectorizer) applied to Python strings, so
    the baseline sees the model's words."""
    return [value.decode("utf-8") for batch in text_batches(texts) for value in standardize(batch).numpy()]


@dataclass(frozen=True)
class BaselineRecipe:
    """How every baseline of a run is fitted (the baseline itself, its learning curve, the teacher's folds)."""
    ngrams: int = 2                  # --baseline-ngrams: the longest word n-gram
    class_weight: str = "none"       # --class-weight
    seed: int = 42                   # --seed
    rows: int = 100_000              # --baseline-rows: the most training texts a baseline fits on

    @classmethod
    def of(cls, config: TrainConfig) -> "BaselineRecipe":
        return cls(config.baseline_ngrams, config.class_weight, config.seed, config.baseline_rows)


def baseline_pipeline(recipe: BaselineRecipe):
    """The baseline before fitting: TF-IDF of word unigrams and bigrams (sublinear term frequency) with logistic
    regression.

    Expects standardized text (see `standardized_strings`); words are split on white space exactly as the
    Keras TextVectorization layer splits them, so the fitted baseline can be exported into the model file."""
    features = TfidfVectorizer(ngram_range=(1, recipe.ngrams), sublinear_tf=True, min_df=2, max_df=0.95,
                               lowercase=False, tokenizer=str.split, token_pattern=None, dtype=np.float32)
    classifier = LogisticRegression(C=8.0, max_iter=1000, random_state=recipe.seed,
                                    class_weight="balanced" if recipe.class_weight == "balanced" else None)
    return make_pipeline(features, classifier)


# The baseline's BLAS threads: one, in this process and in joblib's workers. Logistic regression's sums depend on
# how many threads share them, so one thread gives the same model on any number of cores, fitted here or beside
# others (with two threads here and one in a worker, the coefficients differed by up to 7e-9 on IMDB).
BASELINE_BLAS_THREADS = 1


def fit_baseline(train_texts, train_labels, recipe: BaselineRecipe):
    """The baseline (baseline_pipeline) fitted on standardized texts, with progress lines while it reads them."""
    pipeline = baseline_pipeline(recipe)
    (_, features), (_, classifier) = pipeline.steps
    progress = StageProgress("baseline features: ", len(train_texts), "texts")

    def counted(texts, tell):  # the vectorizer reads the texts once, as they come
        for done, text in enumerate(texts):
            if done and done % 1000 == 0:
                progress(done)
                tell(done)
            yield text

    with threadpool_limits(BASELINE_BLAS_THREADS, user_api="blas"):
        # After the last text the vectorizer sorts and prunes its n-grams without a word: a heartbeat covers it.
        with StageProgress.heartbeat("baseline features: ", len(train_texts), "texts") as tell:
            matrix = features.fit_transform(counted(train_texts, tell))
        progress.close()
        with StageProgress.heartbeat("baseline, logistic regression: ", 1, "fits"):  # (it says nothing itself)
            classifier.fit(matrix, train_labels)
    return pipeline  # both steps fitted


def fit_baselines(parts: list[tuple[list[str], np.ndarray]], recipe: BaselineRecipe) -> list:
    """Independent baselines, one per (texts, labels) part, fitted side by side on the available cores (each of
    scikit-learn's fits runs on one core; joblib, scikit-learn's own, runs them in worker processes): the same
    models as fit_baseline one after another (a test checks it), which is what happens on one core."""
    workers = min(len(parts), joblib.cpu_count())
    if workers <= 1:
        return [fit_baseline(texts, labels, recipe) for texts, labels in parts]
    print(f"Fitting {len(parts)} baselines, {workers} at a time ...")
    models = []
    with (joblib.parallel_config(backend="loky", inner_max_num_threads=BASELINE_BLAS_THREADS),
          StageProgress.heartbeat("fitting baselines: ", len(parts), "baselines") as fitted):
        # (fit_baseline's progress lines come from the workers, whose output is this process's)
        for model in joblib.Parallel(n_jobs=workers, return_as="generator")(
                joblib.delayed(fit_baseline)(texts, labels, recipe) for texts, labels in parts):
            models.append(model)
            fitted(len(models))
    # Idle workers keep their memory (loky keeps them 300 s for reuse): ended now, they give it back before
    # training (about 0.5 GB at 300,000 rows, docs/RESULTS.md), for a second or two to start them again.
    joblib.externals.loky.get_reusable_executor().shutdown(wait=True)
    return models


def baseline_sample(labels: np.ndarray, recipe: BaselineRecipe) -> np.ndarray:
    """The training rows the baselines fit on: all of them, or a seeded, stratified sample of recipe.rows, in
    their order."""
    if len(labels) <= recipe.rows:
        return np.arange(len(labels))
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=recipe.rows, stratify=labels,
                                 random_state=recipe.seed)
    return np.sort(chosen)


BASELINE_CHUNK = 10_000  # texts cleaned and scored by the baseline at a time


def baselines_probabilities(baselines: list, texts, standardize, what: str = "baseline") -> list[np.ndarray]:
    """Each baseline's class probabilities (reviews, classes) for raw texts, a chunk of BASELINE_CHUNK texts at a
    time: each chunk decoded (from a Texts) and cleaned by `standardize` once, then scored by every baseline."""
    progress, chunks = StageProgress(f"{what}: ", len(texts), "texts"), [[] for _ in baselines]
    for start in range(0, len(texts), BASELINE_CHUNK):
        strings = standardized_strings(texts[start:start + BASELINE_CHUNK], standardize)
        for baseline, kept in zip(baselines, chunks):
            kept.append(baseline.predict_proba(strings))
        progress(start + len(strings))
    progress.close()
    return [np.concatenate(kept) if kept else np.zeros((0, len(baseline.classes_)))  # (the model's dtype)
            for baseline, kept in zip(baselines, chunks)]


def baseline_probabilities(baseline, texts, standardize) -> np.ndarray:
    """The baseline's class probabilities (reviews, classes) for raw texts (baselines_probabilities)."""
    return baselines_probabilities([baseline], texts, standardize)[0]


def build_blend_predictor(neural_model, baseline, weight: float, class_names, settings: dict | None = None):
    """One model from raw strings to the blended probabilities, the baseline and the class names inside it."""
    features, classifier = baseline.named_steps["tfidfvectorizer"], baseline.named_steps["logisticregression"]
    vocabulary = features.get_feature_names_out().tolist()
    ngram_ids = layers.TextVectorization(standardize=text_standardizer(neural_model.get_layer("vectorizer")),
                                         ngrams=tuple(range(1, features.ngram_range[1] + 1)),
                                         output_mode="int",
                                         vocabulary=vocabulary, name="ngram_ids")
    binary = len(classifier.classes_) == 2  # scikit-learn then keeps one row of coefficients
    scorer = TfidfLogistic(len(vocabulary) + 2, 1 if binary else len(classifier.classes_), name="tfidf_logistic")
    # Ids 0 (padding) and 1 (out of vocabulary) get zero weight, as unseen n-grams do in scikit-learn.
    scorer.build(None)
    coef, intercept = (classifier.coef_[0], classifier.intercept_[0]) if binary else (classifier.coef_.T,
                                                                                       classifier.intercept_)
    scorer.set_weights([np.concatenate([[0.0, 0.0], features.idf_]).astype(np.float32),
                        np.concatenate([np.zeros((2, *coef.shape[1:])), coef]).astype(np.float32),
                        np.asarray(intercept, dtype=np.float32)])
    text = keras.Input(shape=(1,), dtype="string", name="text")
    blended = WeightedBlend(weight, name="blend")([neural_model(text), scorer(ngram_ids(text))])
    probabilities = ClassNames(class_names, settings, name="class_names")(blended)
    return keras.Model(text, probabilities, name="blended_sentiment_model")


def predicted_labels(probabilities: np.ndarray, threshold: float = DECISION_THRESHOLD) -> np.ndarray:
    """Class indices from (reviews, classes) probabilities: for two classes positive when its probability is
    at least `threshold`, for more the most probable class."""
    return counted_classes(probabilities.shape[1]).decide(probabilities, threshold)


def shown_probability(probabilities: np.ndarray) -> tuple[np.ndarray, str]:
    """The probability shown beside a prediction, and its column name: the positive class's for two classes
    (so that it reads the same way for every review), the predicted class's for more."""
    classes = counted_classes(probabilities.shape[1])
    return classes.shown(probabilities), classes.shown_column


def accuracy_of(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return round(float(np.mean(predicted_labels(probabilities) == labels)), 4)


# ----------------------------------------------------------------------------------------------------------
# Noise: 95% intervals from a bootstrap over the rows, paired comparisons, and McNemar's exact test
# ----------------------------------------------------------------------------------------------------------


# Every interval is a percentile bootstrap: the rows are drawn with replacement BOOTSTRAP_RESAMPLES times with a
# fixed seed, the figure is computed on each draw, and the middle 95% of those values is the interval. Every
# model is scored on the same draws, so the difference of two models on a draw is paired (the rows both get
# right or both get wrong cancel out), which is what makes a paired interval narrower than the two intervals.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_CELLS = 4_000_000  # draws x rows held in memory at once (about 100 MB of working arrays)
INTERVAL_LEVEL = 0.95
INTERVALS_METHOD = (f"{INTERVAL_LEVEL:.0%} percentile bootstrap over the {{rows}} test rows: {BOOTSTRAP_RESAMPLES} "
                    f"draws with seed {BOOTSTRAP_SEED}, the same draws for every model (comparisons are paired); "
                    "McNemar's exact test on the rows only one of two models gets right")


def bootstrap_draws(rows: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    stage: str | None = None):
    """The bootstrap's draws, a block at a time: (draws, rows) arrays of how often each row was drawn; with a
    `stage`, counted in a progress line (a minute of draws for 400,000 rows)."""
    generator = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_CELLS // max(rows, 1))
    progress = StageProgress(stage, resamples, "draws") if stage else None
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        drawn = generator.integers(0, rows, size=(size, rows)) + np.arange(size)[:, None] * rows
        yield np.bincount(drawn.ravel(), minlength=size * rows).reshape(size, rows).astype(np.float32)
        if progress:
            progress(start + size)
    if progress:
        progress.close()


def drawn_f1(counts: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """F1 of one class (boolean truth and prediction per row) on each draw; 0 where it has no true or predicted row,
    as scikit-learn's zero_division=0."""
    true_positive = counts @ (truth & predicted)
    wrong = counts @ (truth ^ predicted)
    denominator = 2 * true_positive + wrong
    return np.divide(2 * true_positive, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def drawn_auc(counts: np.ndarray, truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of one class (boolean truth, a score per row) on each draw: the chance that a drawn positive row
    scores above a drawn negative one, ties counting half (the Mann-Whitney form, as roc_auc_score); NaN on a
    draw without both."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    # Each sorted row's group of tied scores: [start, end) in sorted positions.
    new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    starts = np.flatnonzero(new_group)
    group = np.cumsum(new_group) - 1
    ends = np.r_[starts[1:], len(scores)]
    drawn = counts[:, order]
    negatives_through = np.zeros((len(counts), len(scores) + 1))  # negatives drawn in sorted positions < k
    np.cumsum(drawn * ~sorted_truth, axis=1, out=negatives_through[:, 1:])
    positive = np.flatnonzero(sorted_truth)
    below, through = starts[group[positive]], ends[group[positive]]
    # A positive row beats the negatives below its group and ties with those in it.
    beaten = 0.5 * (negatives_through[:, below] + negatives_through[:, through])
    wins = np.einsum("ij,ij->i", drawn[:, positive], beaten)
    pairs = drawn[:, positive].sum(axis=1) * negatives_through[:, -1]
    return np.divide(wins, pairs, out=np.full_like(wins, np.nan), where=pairs > 0)


def interval_figures(class_names) -> tuple[str, ...]:
    """The headline figures that carry an interval: accuracy, F1 (macro for several classes) and ROC AUC."""
    return label_set(class_names).interval_figures


def bootstrap_figures(labels: np.ndarray, probabilities: dict[str, np.ndarray], class_names,
                      figures: tuple[str, ...] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Each model's figures (accuracy, F1 or macro F1, ROC AUC; or those named) on each bootstrap draw of the rows,
    the same draws for every model: model -> figure -> (draws,) values."""
    figures = figures or interval_figures(class_names)
    classes, auc_classes = range(len(class_names)), label_set(class_names).auc_classes
    values = {name: {figure: [] for figure in figures} for name in probabilities}
    for counts in bootstrap_draws(len(labels), stage="intervals: "):
        for name, model in probabilities.items():
            predicted = predicted_labels(model)
            for figure in figures:
                if figure == "accuracy":
                    value = counts @ (predicted == labels) / len(labels)
                elif figure == "f1":
                    value = drawn_f1(counts, labels == 1, predicted == 1)
                elif figure == "f1_macro":
                    value = np.mean([drawn_f1(counts, labels == c, predicted == c) for c in classes], axis=0)
                else:  # roc_auc: of the positive class of two, else one-vs-rest, macro
                    value = np.mean([drawn_auc(counts, labels == c, model[:, c]) for c in auc_classes], axis=0)
                values[name][figure].append(value)
    return {name: {figure: np.concatenate(parts) for figure, parts in figures_of.items()}
            for name, figures_of in values.items()}


def percentile_interval(values: np.ndarray) -> list[float]:
    """The middle INTERVAL_LEVEL of the bootstrap values (draws where the figure is undefined left out)."""
    tail = 100 * (1 - INTERVAL_LEVEL) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return [round(float(low), 4), round(float(high), 4)]


def mean_intervals(columns: list[np.ndarray], stage: str = "intervals: ") -> list[list[float]]:
    """The bootstrap interval of the mean of each column, a value per row of the same rows (1 or 0 for right or
    wrong: the accuracy), all on one pass of the draws, with progress (five columns of 200,000 rows, a pass each,
    took 17 s in silence, one pass 4.5 s: docs/RESULTS.md)."""
    columns = [np.asarray(values, dtype=np.float64) for values in columns]
    rows, means = len(columns[0]), [[] for _ in columns]
    for counts in bootstrap_draws(rows, stage=stage):
        for drawn, values in zip(means, columns):
            drawn.append(counts @ values / rows)
    return [percentile_interval(np.concatenate(drawn)) for drawn in means]


def mean_interval(values: np.ndarray) -> list[float]:
    return mean_intervals([values])[0]


def mcnemar_p_value(first_only: int, second_only: int) -> float:
    """McNemar's exact test: the two-sided binomial p-value of the rows only one of two models gets right
    (first_only against second_only), under the hypothesis that either is as likely to be the one."""
    discordant, fewer = first_only + second_only, min(first_only, second_only)
    if discordant == 0:
        return 1.0
    # P(X <= fewer) for X ~ Binomial(discordant, 1/2), summed in logarithms (exact to rounding at any size).
    logs = [math.lgamma(discordant + 1) - math.lgamma(k + 1) - math.lgamma(discordant - k + 1)
            for k in range(fewer + 1)]
    top = max(logs)
    tail = math.exp(top + math.log(sum(math.exp(value - top) for value in logs)) - discordant * math.log(2))
    return float(min(1.0, 2 * tail))


@dataclass(frozen=True)
class Comparison:
    """Two models' accuracy on the same rows: the difference (first minus second), its paired interval, McNemar's
    p-value, and the rows only one of them got right. Level when the interval holds zero or McNemar's p is 0.05 or
    more: on a few hundred rows the percentile bootstrap's interval can be a little too narrow, and the exact test
    then keeps a verdict from resting on it alone."""
    first: str
    second: str
    split: str
    difference: float
    interval: list[float]
    p_value: float
    first_only: int
    second_only: int

    @property
    def level(self) -> bool:
        return self.interval[0] <= 0 <= self.interval[1] or self.p_value >= 0.05

    def spread(self) -> str:
        """The difference in points, its interval and McNemar's p-value: '+0.2 points, -0.5 to +0.9; McNemar p =
        0.61'."""
        low, high = (100 * bound for bound in self.interval)
        return f"{100 * self.difference:+.1f} points, {low:+.1f} to {high:+.1f}; McNemar p = {self.p_value:.2g}"

    def margin(self) -> str:
        """'by 1.3 points (0.6 to 2.0; McNemar p = 0.001)': the size of the difference, its interval the same way."""
        low, high = sorted(abs(100 * bound) if self.difference > 0 else -100 * bound for bound in self.interval)
        return f"by {abs(100 * self.difference):.1f} points ({low:.1f} to {high:.1f}; McNemar p = {self.p_value:.2g})"

    def words(self) -> str:
        """'ahead by 1.3 points (0.6 to 2.0; ...)', or 'level: the difference is within noise (...)'."""
        if self.level:
            return f"level: the difference is within noise ({self.spread()})"
        return f"{'ahead' if self.difference > 0 else 'behind'} {self.margin()}"

    def sentence(self) -> str:
        if self.level:
            return (f"On the {self.split} split the {self.first} and the {self.second} are level: the difference is "
                    f"within noise ({self.spread()}).")
        return (f"On the {self.split} split the {self.first} is {'ahead of' if self.difference > 0 else 'behind'} the "
                f"{self.second} {self.margin()}.")

    def summary(self) -> dict:
        return {"first": self.first, "second": self.second, "split": self.split, "figure": "accuracy",
                "difference": round(self.difference, 4), "interval": self.interval, "mcnemar_p": self.p_value,
                "first_only_right": self.first_only, "second_only_right": self.second_only, "level": self.level,
                "words": self.words()}


def compare_models(labels: np.ndarray, first: np.ndarray, second: np.ndarray, names: tuple[str, str], split: str,
                   drawn: dict[str, dict[str, np.ndarray]] | None = None) -> Comparison:
    """The paired comparison of two models' (rows, classes) probabilities on the same rows (bootstrap draws of
    their accuracy already made on these rows may be given: {name: {"accuracy": draws}})."""
    first_right, second_right = predicted_labels(first) == labels, predicted_labels(second) == labels
    if drawn is None:
        interval = mean_interval(first_right.astype(float) - second_right)
    else:
        interval = percentile_interval(drawn[names[0]]["accuracy"] - drawn[names[1]]["accuracy"])
    first_only = int(np.sum(first_right & ~second_right))
    second_only = int(np.sum(~first_right & second_right))
    return Comparison(names[0], names[1], split, float(first_right.mean() - second_right.mean()), interval,
                      mcnemar_p_value(first_only, second_only), first_only, second_only)


def with_interval(value: float, bounds: list[float] | None) -> str:
    """A figure as the terminal and the report show it: 0.9081 (0.9024–0.9138)."""
    return f"{value:.4f}" if bounds is None else f"{value:.4f} ({bounds[0]:.4f}–{bounds[1]:.4f})"


def choose_blend_weight(labels, neural, baseline) -> float:
    """The weight of the neural model (0 to 1 in steps of 0.05) with the lowest log loss on validation data.

    Log loss, a proper scoring rule, varies smoothly with the weight; validation accuracy moves in steps of
    single reviews and would make the choice noisy."""
    clipped = counted_classes(neural.shape[1]).log_loss_input
    weights = np.round(np.arange(0, 1.0001, 0.05), 2)
    classes = list(range(neural.shape[1]))
    losses = [log_loss(labels, clipped(blend_probabilities(w, neural, baseline)), labels=classes) for w in weights]
    return float(weights[int(np.argmin(losses))])


EQUAL_BLEND_WEIGHT = 0.5  # the plain choice when the validation split cannot tell the weights apart


@dataclass
class Blend:
    weight: float
    validation_accuracy: dict[str, float] | None  # of each part and the blend, when the weight was chosen here
    reason: str = "as given"                      # how the weight was chosen, in words


def row_log_loss(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Each row's log loss: minus the log of the probability given to its true class."""
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0))


def choose_blend(blend_weight: float | str, arch: str, validation_labels: np.ndarray, neural: np.ndarray,
                 baseline: np.ndarray) -> Blend:
    """--blend-weight W as given, or with auto the weight chosen on the validation split (never the test), from
    the two models' validation probabilities: the weight of the lowest log loss, if its log loss is lower than
    that of equal weights beyond noise (the paired bootstrap interval of the rows' log-loss difference is below
    zero), else EQUAL_BLEND_WEIGHT; then, if one part alone is more accurate than that blend beyond noise, that
    part gets all the weight (on small data an overconfident neural model can lower the log loss of a blend that
    gets more reviews wrong)."""
    if blend_weight != "auto":
        return Blend(blend_weight, None)
    labels = validation_labels
    weight, reason = choose_blend_weight(labels, neural, baseline), "the lowest validation log loss"
    if weight != EQUAL_BLEND_WEIGHT:
        gain = mean_interval(row_log_loss(labels, blend_probabilities(weight, neural, baseline))
                             - row_log_loss(labels, blend_probabilities(EQUAL_BLEND_WEIGHT, neural, baseline)))
        if gain[1] >= 0:
            reason = (f"equal weights: the validation split cannot tell {weight:.2f} (the lowest log loss) from "
                      f"{EQUAL_BLEND_WEIGHT:.2f} (log-loss difference {gain[0]:+.4f} to {gain[1]:+.4f})")
            weight = EQUAL_BLEND_WEIGHT
    blended = blend_probabilities(weight, neural, baseline)
    better, part_weight, part = ((arch, 1.0, neural) if accuracy_of(labels, neural) > accuracy_of(labels, baseline)
                                 else ("baseline", 0.0, baseline))
    comparison = compare_models(labels, part, blended, (better, "blend"), "validation")
    if comparison.difference > 0 and not comparison.level:
        weight, blended = part_weight, part
        reason = f"all on the {better}: alone it is more accurate than the blend ({comparison.words()})"
    # Reported so that presets can be compared on validation data, never on the test set.
    accuracy = {arch: accuracy_of(labels, neural), "baseline": accuracy_of(labels, baseline),
                "blend": accuracy_of(labels, blended)}
    return Blend(weight, accuracy, reason)


# The baseline's learning curve: it is fitted again on these shares of the training split (the whole split is
# the baseline itself) and scored on the validation split, so a user sees whether more labels would help.
BASELINE_CURVE_FRACTIONS = (0.1, 0.25, 0.5)


def curve_points(points: list[tuple[float, int, np.ndarray]], labels: np.ndarray) -> list[dict]:
    """The learning curve's points from (share, training rows, validation probabilities), their intervals on
    the same draws."""
    intervals = mean_intervals([predicted_labels(probabilities) == labels for _, _, probabilities in points],
                               "intervals of the learning curve: ")
    return [{"share": share, "training_rows": rows, "validation_accuracy": accuracy_of(labels, probabilities),
             "interval": interval} for (share, rows, probabilities), interval in zip(points, intervals)]


def baseline_learning_curve(baseline, train_strings: list[str], train_labels: np.ndarray, validation: LabelledTexts,
                            standardize, recipe: BaselineRecipe) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    """Validation accuracy (with its 95% interval) of the baseline fitted on a stratified share of the training
    split (its texts `train_strings`), for each share of BASELINE_CURVE_FRACTIONS, then of the baseline itself
    (fitted on the whole split). A share too small to fit (a class or every word missing) is left out. Returns
    the baseline's validation probabilities, the curve, and the validation probabilities of the baseline fitted on
    half the split (None if left out), which the advice compares with the whole split's. The validation texts are
    scored a chunk at a time, by every model in turn (baselines_probabilities)."""

    shares = []
    for fraction in BASELINE_CURVE_FRACTIONS:
        rows = round(fraction * len(train_labels))
        try:
            chosen, _ = train_test_split(np.arange(len(train_labels)), train_size=rows, stratify=train_labels,
                                         random_state=recipe.seed)
        except ValueError:
            continue
        shares.append((fraction, rows, ([train_strings[i] for i in chosen], train_labels[chosen])))
    try:
        models = fit_baselines([part for _, _, part in shares], recipe)
    except ValueError:  # a share that cannot be fitted (no word in two of its texts): the others, one by one
        models = []
        for _, _, (texts, labels) in shares:
            try:
                models.append(fit_baseline(texts, labels, recipe))
            except ValueError:
                models.append(None)
    fitted = [(fraction, rows, model) for (fraction, rows, _), model in zip(shares, models) if model is not None]
    whole, *scored = baselines_probabilities([baseline] + [model for _, _, model in fitted], validation.texts,
                                             standardize, f"validation, {1 + len(fitted)} baselines")
    points = [(fraction, rows, probabilities) for (fraction, rows, _), probabilities in zip(fitted, scored)]
    half = next((probabilities for fraction, _, probabilities in points if fraction == 0.5), None)
    return whole, curve_points(points + [(1.0, len(train_labels), whole)], validation.labels), half


@dataclass
class ValidationCheck:
    """The models on the validation split, which every choice and every piece of advice is based on (the test
    split is only scored)."""
    labels: np.ndarray
    neural: np.ndarray                   # (reviews, classes) probabilities of the neural model
    baseline: np.ndarray | None          # and of the baseline
    baseline_curve: list[dict]           # see baseline_learning_curve
    half_baseline: np.ndarray | None = None  # probabilities of the baseline fitted on half the training split

    def accuracy(self) -> dict[str, float]:
        return {"neural": accuracy_of(self.labels, self.neural),
                **({"baseline": accuracy_of(self.labels, self.baseline)} if self.baseline is not None else {})}


def compare_on_validation(classifier, baseline, validation_ids: ReviewIds, splits: DataSplits,
                          train_strings: list[str] | None, rows: np.ndarray | None, standardize,
                          recipe: BaselineRecipe) -> ValidationCheck:
    """Both models' validation probabilities, and the baseline's learning curve (on its sample's texts,
    train_strings, the training split's `rows`)."""
    neural = predict_token_ids(classifier, validation_ids)
    if baseline is None:
        return ValidationCheck(splits.validation.labels, neural, None, [])
    probabilities, curve, half = baseline_learning_curve(baseline, train_strings, splits.train.labels[rows],
                                                         splits.validation, standardize, recipe)
    return ValidationCheck(splits.validation.labels, neural, probabilities, curve, half)


MIN_CURVE_GAIN = 0.01  # the least validation accuracy gained from half the labels to all that the advice mentions


def advice(check: ValidationCheck, arch: str, blend: Blend | None) -> list[str]:
    """What to trust, in plain words, from the validation split, each only when its difference is beyond noise
    (not Comparison.level: the paired bootstrap interval excludes zero and McNemar's p is below 0.05): whether the
    baseline beats the model this run saves (the blend, with any --blend-weight; else the neural model) and what
    to use instead, or that the two are level (then the cheaper baseline will do); and whether the baseline's
    learning curve still rises. A blend of weight 0 is the baseline itself: nothing to compare."""
    notes = []
    if check.baseline is not None and not (blend is not None and blend.weight == 0.0):
        saved, name = check.neural, arch
        if blend is not None and blend.weight < 1.0:
            saved, name = blend_probabilities(blend.weight, check.neural, check.baseline), "blend"
        comparison = compare_models(check.labels, saved, check.baseline, (name, "baseline"), "validation")
        ours, theirs = accuracy_of(check.labels, saved), accuracy_of(check.labels, check.baseline)
        if comparison.level:
            notes.append(f"The {name} and the baseline are level on the validation split: {ours:.4f} against "
                         f"{theirs:.4f} accuracy, a difference within noise ({comparison.spread()}). The baseline is "
                         "the cheaper one to use: it fits in seconds and predicts many times faster.")
        elif comparison.difference < 0:
            better = ("--preset best (the model blended with the baseline) or the baseline's figures" if blend is None
                      else "the baseline's figures")
            notes.append(f"The baseline is better on this data: {theirs:.4f} against {ours:.4f} accuracy for the "
                         f"{name} on the validation split (the {name} is {comparison.words()}). Trust {better}.")
    curve = check.baseline_curve
    if (check.half_baseline is not None and len(curve) >= 2 and curve[-1]["share"] == 1.0
            and curve[-2]["share"] == 0.5):
        gain = compare_models(check.labels, check.baseline, check.half_baseline, ("baseline", "half"), "validation")
        if gain.difference >= MIN_CURVE_GAIN and not gain.level:
            notes.append(f"More labelled data would likely help: the baseline gained {gain.difference:.4f} validation "
                         f"accuracy from half of the training split to all of it ({gain.words()}).")
    return notes


# ----------------------------------------------------------------------------------------------------------
# Devices: one machine, several GPUs (or logical CPUs), or the workers of a cluster described by TF_CONFIG
# ----------------------------------------------------------------------------------------------------------


def logical_cpus(count: int) -> list[str]:
    """Split the CPU into `count` logical devices (once per process, before TensorFlow starts its runtime)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # The runtime has started: use the devices it has, if there are enough.
        if len(tf.config.list_logical_devices("CPU")) < count:
            raise
    return [f"/cpu:{index}" for index in range(count)]


def choose_strategy(cpu_replicas: int, role: ClusterRole | None):
    """TF_CONFIG set: MultiWorkerMirroredStrategy across the cluster's workers. Otherwise, with several GPUs
    (or --cpu-replicas N): MirroredStrategy on this machine. Otherwise TensorFlow's default strategy."""

    if role:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if cpu_replicas > 1 and not gpus:
        # Summed on one device rather than with collective ops, whose cached shapes would clash when a second
        # strategy is made in the same process (as the in-process tests do).
        return tf.distribute.MirroredStrategy(logical_cpus(cpu_replicas),
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    return tf.distribute.get_strategy()


def strategy_name(strategy, role: ClusterRole | None) -> str:
    # TensorFlow's class for MultiWorkerMirroredStrategy is called CollectiveAllReduceStrategy.
    return "MultiWorkerMirroredStrategy" if role else type(strategy).__name__


def use_op_threads(threads: int | None) -> None:
    """The threads of each TensorFlow op (Architecture.op_threads), before TensorFlow's runtime starts; the
    environment's TF_NUM_INTRAOP_THREADS wins, and a process whose runtime has started (tests: several runs)
    keeps its own."""
    if threads is not None and not os.environ.get("TF_NUM_INTRAOP_THREADS"):
        with contextlib.suppress(RuntimeError):  # "cannot be modified after initialization"
            tf.config.threading.set_intra_op_parallelism_threads(threads)


def set_up_tensorflow(cpu_replicas: int, seed: int, mixed_precision: bool, role: ClusterRole | None,
                      op_threads: int | None = None):
    """The threads of each op, then the distribution strategy (a cluster's must exist before any other TensorFlow
    work), then seed everything and make ops deterministic, so the same seed gives the same run on the same
    machine."""
    use_op_threads(op_threads)
    strategy = choose_strategy(cpu_replicas, role)

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    if mixed_precision:
        if tf.config.list_physical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            print("warning: --mixed-precision needs a GPU; training in float32", file=sys.stderr)
    replicas, gpus = strategy.num_replicas_in_sync, len(tf.config.list_physical_devices("GPU"))
    # Where training runs, in plain words; the strategy's name only where there is more than one replica.
    if role:
        where = f"as {role.name} of {role.workers} workers"
    elif replicas == 1:
        threads = tf.config.threading.get_intra_op_parallelism_threads()
        where = "on the GPU" if gpus else f"on the CPU, {os.cpu_count()} cores" + (
            f", {threads} thread{'s' if threads > 1 else ''} per op" if threads else "")
    else:
        where = f"on {replicas} GPUs" if gpus else f"on {replicas} logical CPU devices"
    cluster = f" on {role.workers} worker(s)" if role else ""
    mirrored = f" ({strategy_name(strategy, role)} with {replicas} replica(s){cluster})" if replicas > 1 or role else ""
    print(f"Training {where}{mirrored}; TensorFlow {tf.__version__}")
    return strategy


# ----------------------------------------------------------------------------------------------------------
# The training loop: one loop for every setup, with early stopping and a state saved after every epoch
# ----------------------------------------------------------------------------------------------------------


HISTORY_NAMES = ("loss", "accuracy", "val_loss", "val_accuracy")  # a classifier's figures per epoch


@dataclass(frozen=True)
class Steps:
    """What the training loop runs: a training step and a validation step (each a distributed step over the
    next batch of an iterator, returning the summed loss, right answers and count)."""
    train: object
    validation: object


def on_all_replicas(strategy, batch_function):
    """A step of the training loop: `batch_function` on the next batch of a distributed iterator, on every
    replica, its sums added up over them.

    The batch is taken from the iterator here, outside the compiled step, which gets it as its argument (one
    trace per kind of iterator, of any batch shape: its element spec is the signature). With next() inside the
    compiled step, as Keras' own fit does, two passes in three over the same fixed batches ran about 1.4x slower
    than the kernel alone on 2 cores; with the batch passed in, none of three did (docs/RESULTS.md, "Speed")."""
    compiled = {}

    def step(iterator):
        spec = iterator.element_spec
        key = repr(spec)
        if key not in compiled:
            @tf.function(input_signature=[spec])
            def replicated(batch):
                per_replica = strategy.run(batch_function, args=batch)
                return [strategy.reduce("SUM", value, axis=None) for value in per_replica]
            compiled[key] = replicated
        return compiled[key](next(iterator))
    return step


def build_step_functions(classifier, optimizer, strategy, class_weights: np.ndarray | None = None) -> Steps:
    """One training step and one validation step over a batch split across the strategy's replicas.

    Each returns the batch's summed loss, number of correct predictions and number of reviews (padding
    reviews, of weight 0, not counted), added up over all replicas (and workers), from which the epoch's mean
    loss and accuracy follow. With class weights, each training review's loss is weighted by its class's
    weight (validation stays unweighted, as in Keras' fit).

    The labels may also be a teacher's probabilities (soft targets): the positive class's probability for two
    classes, a row of class probabilities for more. The loss is then the cross-entropy against them, and a
    prediction counts as right when it is the teacher's most probable class."""

    rules = counted_classes(count_classes(classifier))

    def sums(labels, weights, outputs, class_weighted=False):
        # Keras computes the loss from the sigmoid's or softmax's input, which is exact for confident
        # predictions, where clipped probabilities would cap the loss.
        losses, predicted, truth = rules.losses_and_answers(labels, outputs)
        loss_weights = weights
        if class_weighted and class_weights is not None:
            # A soft target (a teacher's) weighs as the class it leans to.
            leaning = tf.cast(rules.leaning(labels), tf.int32)
            loss_weights = weights * tf.gather(tf.constant(class_weights), leaning)
        correct = tf.cast(predicted == truth, tf.float32)
        return losses, [tf.reduce_sum(losses * loss_weights), tf.reduce_sum(correct * weights),
                        tf.reduce_sum(weights)]

    def train_batch(token_ids, labels, weights):
        # The loss is the weighted mean over the real reviews of the whole global batch: this replica's weighted
        # sum divided by the number of real reviews on all replicas, because the optimizer sums the replicas'
        # gradients. Padding reviews (weight 0) change neither the loss nor the gradient.
        real_reviews = tf.distribute.get_replica_context().all_reduce("SUM", tf.reduce_sum(weights))
        with tf.GradientTape() as tape:
            losses, batch_sums = sums(labels, weights, classifier(token_ids, training=True), class_weighted=True)
            loss = optimizer.scale_loss(batch_sums[0] / real_reviews)
        gradients = tape.gradient(loss, classifier.trainable_variables)
        optimizer.apply(gradients, classifier.trainable_variables)
        return batch_sums

    def validation_batch(token_ids, labels, weights):
        return sums(labels, weights, classifier(token_ids, training=False))[1]

    return Steps(on_all_replicas(strategy, train_batch), on_all_replicas(strategy, validation_batch))


@dataclass
class EpochProgress:
    """How far a pass has come: its batches done and the running sums of the loss, the right answers and the
    reviews (saved mid-epoch on SIGTERM, so that the resumed epoch ends with the very same figures)."""
    batches: int = 0
    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0

    def scores(self) -> dict:
        """The mean loss and accuracy per review."""
        return {"loss": self.loss / self.count, "accuracy": self.correct / self.count}


def run_epoch(step, dataset, steps: int, progress=None, on_batch=None, done: EpochProgress | None = None,
              stop=None, shown: tuple[str, ...] = ("loss", "accuracy")) -> EpochProgress:
    """Run `step` over a pass of the distributed dataset, from batch `done.batches` on (the dataset starts
    there), to batch `steps` or until `stop()` is true after a step. `on_batch(index, mean loss of the batch)`
    is told of each batch; `progress` shows the `shown` running figures."""
    done = dataclasses.replace(done) if done else EpochProgress()
    iterator = iter(dataset)
    for index in range(done.batches, steps):
        batch_loss, batch_correct, batch_count = (float(value) for value in step(iterator))
        done.loss, done.correct, done.count = done.loss + batch_loss, done.correct + batch_correct, \
            done.count + batch_count
        done.batches = index + 1
        if progress:
            progress.update(index + 1, [(name, value) for name, value in done.scores().items() if name in shown],
                            finalize=False)
        if on_batch:
            on_batch(index, batch_loss / max(batch_count, 1.0))
        if stop is not None and stop():
            break
    return done


class TrainingLog:
    """TensorBoard summaries of training in LOG_DIR/train and LOG_DIR/validation, named as Keras' TensorBoard
    callback names them (which the custom loop cannot use): epoch_loss, epoch_accuracy and
    epoch_learning_rate at each epoch's number, and batch_loss every BATCH_EVERY steps at the global step. A
    resumed run adds a new event file to the same directories and goes on from the epoch it resumes after.
    Without a directory (a worker other than the chief) it writes nothing."""
    BATCH_EVERY = 25

    def __init__(self, log_dir: Path | None):
        if log_dir is None:
            self.train = self.validation = tf.summary.create_noop_writer()
        else:
            self.train = tf.summary.create_file_writer(str(log_dir / "train"))
            self.validation = tf.summary.create_file_writer(str(log_dir / "validation"))

    def batch(self, global_step: int, loss: float) -> None:
        if global_step % self.BATCH_EVERY == 0:
            with self.train.as_default():
                tf.summary.scalar("batch_loss", loss, step=global_step)

    def epoch(self, epoch: int, scores: dict, learning_rate: float) -> None:
        """Each figure as epoch_NAME, a val_NAME one in the validation directory."""
        with self.train.as_default():
            for name, value in scores.items():
                if not name.startswith("val_"):
                    tf.summary.scalar(f"epoch_{name}", value, step=epoch)
            tf.summary.scalar("epoch_learning_rate", learning_rate, step=epoch)
        with self.validation.as_default():
            for name, value in scores.items():
                if name.startswith("val_"):
                    tf.summary.scalar(f"epoch_{name[len('val_'):]}", value, step=epoch)
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def numbered_arrays(arrays, prefix: str) -> list[np.ndarray]:
    """The arrays saved as PREFIX0, PREFIX1, ... in that order."""
    names = sorted((name for name in arrays.files if name.startswith(prefix)), key=lambda n: int(n[len(prefix):]))
    return [arrays[name] for name in names]


TARGETS = "targets"  # the fingerprint's entry for what the run learns from (SemiSupervised.shaping)


def same_training(saved: dict, fingerprint: dict) -> bool:
    """Whether a saved state's fingerprint is this run's. Before the data is read, what the run learns from is
    not known yet (auto chooses it from the data's sizes) and `fingerprint` has no TARGETS: the rest must match
    then, and all of it once the run has chosen."""
    if TARGETS not in fingerprint:
        saved = {name: value for name, value in saved.items() if name != TARGETS}
    return saved == json.loads(json.dumps(fingerprint))


@dataclass
class TrainingState:
    """Where training stands after its last whole epoch (or, stopped by SIGTERM, after its last step): saved
    after every epoch, so that a crashed run goes on from there. The arrays are every model and optimizer
    variable (weights, Adam moments, step count, dropout seed state) and the best weights so far."""
    fingerprint: dict
    epoch: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    epoch_seconds: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int | None = None
    wait: int = 0  # epochs since the best one
    epoch_progress: dict | None = None  # an EpochProgress of the next epoch, when SIGTERM stopped it part-way
    variable_values: list[np.ndarray] | None = field(default=None, repr=False)
    best_weights: list[np.ndarray] | None = field(default=None, repr=False)

    ARRAY_FIELDS = ("variable_values", "best_weights")

    def save(self, state_dir: Path) -> None:
        """The arrays go first and state.json, naming them, last (each written whole): a crash at any moment
        leaves the previous complete state."""
        state_dir.mkdir(parents=True, exist_ok=True)
        arrays_name = f"epoch-{self.epoch}.npz"
        arrays = {f"variable_{i}": value for i, value in enumerate(self.variable_values or [])}
        arrays.update({f"best_{i}": weight for i, weight in enumerate(self.best_weights or [])})
        with _atomic_path(state_dir / arrays_name) as temporary:
            np.savez(temporary, **arrays)
        record = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)
                  if spec.name not in self.ARRAY_FIELDS}
        _write_text(state_dir / "state.json", json.dumps({**record, "arrays": arrays_name}))
        for path in state_dir.iterdir():
            if path.is_file() and path.name not in {"state.json", arrays_name}:  # a stage's own state: a directory
                path.unlink()

    @classmethod
    def load(cls, state_dir: Path, fingerprint: dict) -> TrainingState | None:
        """The state a crashed run left in state_dir, if any; refused if it was saved with other settings, and
        a one-line error if it cannot be read."""
        state_file = state_dir / "state.json"
        if not state_file.is_file():
            return None
        try:
            record = json.loads(state_file.read_text())
            arrays_name = record.pop("arrays")
            state = cls(**record)
            with np.load(state_dir / arrays_name) as arrays:
                state.variable_values = numbered_arrays(arrays, "variable_")
                state.best_weights = numbered_arrays(arrays, "best_") or None
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as error:
            raise UserError(f"the training state in {state_dir} cannot be read ({type(error).__name__}); "
                            "add --fresh to start over") from None
        if not same_training(state.fingerprint, fingerprint):
            raise UserError(f"the training state in {state_dir} was saved with other settings or other data; "
                            "run with the same flags to resume, or add --fresh to start over")
        return state


def check_workers_agree(strategy, epoch: int) -> None:
    """In a cluster every worker must resume from the same epoch, or their steps would not line up."""

    def this_worker():
        return tf.constant([epoch])

    @tf.function
    def every_worker():
        return strategy.gather(strategy.run(this_worker), axis=0)

    epochs = sorted(set(every_worker().numpy().tolist()))
    if len(epochs) > 1:
        raise UserError(f"the workers saved training states of different epochs ({epochs}); "
                        "run every worker with --fresh")


@dataclass
class TrainingResult:
    history: dict[str, list[float]]
    epoch_seconds: list[float]
    epochs_run: int
    best_epoch: int | None
    interrupted: bool
    resumed_after_epoch: int
    plan: TrainingPlan
    tokens_per_epoch: int | None = None  # the real (unpadded) tokens of an epoch, set by the stage that trained

    def summary(self) -> dict:
        """What the report records of training: the plan, then what came of it (and its tokens a second)."""
        speed = ({"tokens_per_epoch": self.tokens_per_epoch,
                  "tokens_per_second": round(self.tokens_per_epoch * len(self.epoch_seconds) / sum(self.epoch_seconds))}
                 if self.tokens_per_epoch and self.epoch_seconds and sum(self.epoch_seconds) > 0 else {})
        return {**self.plan.summary(), "epochs_run": self.epochs_run, "best_epoch": self.best_epoch,
                "interrupted": self.interrupted, "resumed_after_epoch": self.resumed_after_epoch, **speed}


def restore_training_state(classifier, optimizer, saved: TrainingState | None, fingerprint: dict,
                           state_dir: Path) -> TrainingState:
    """The state to train from: a saved one, its values put back into the model's and the optimizer's
    variables (Adam's moments, the step count, the dropout seed state), or a new one."""
    if saved is None:
        return TrainingState(fingerprint=fingerprint)
    for variable, value in zip(classifier.variables + optimizer.variables, saved.variable_values):
        variable.assign(value)
    where = (f"in epoch {saved.epoch + 1} after batch {saved.epoch_progress['batches']}" if saved.epoch_progress
             else f"after epoch {saved.epoch}")
    print(f"Resuming {where} from the state saved in {state_dir} (add --fresh to start over)")
    return saved


def clear_old_curves(log_dir: Path | None, resuming: bool) -> None:
    """A new run's TensorBoard curves replace the last run's, as its files do; a resumed run goes on with them."""
    if log_dir is not None and not resuming:
        shutil.rmtree(log_dir, ignore_errors=True)


class Checkpoints:
    """What the training loop leaves to others, as a context around it: saving the training state (after every
    epoch, and part-way when SIGTERM asks), the SIGTERM handler, Ctrl-C (the loop stops, the run goes on with the
    best weights so far: `interrupted`), and a lost cluster worker as one line.

    SIGTERM only asks the loop to stop after its step, in one process: a cluster's workers must stop together,
    so there the signal keeps its default and the last whole epoch's state is what a rerun resumes from."""

    def __init__(self, state: TrainingState, state_dir: Path, variables: list, multi_worker: bool):
        self.state, self.state_dir, self.variables, self.multi_worker = state, state_dir, variables, multi_worker
        self.terminated, self.interrupted, self.previous_handler = threading.Event(), False, None

    def __enter__(self) -> "Checkpoints":
        if not self.multi_worker and threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: self.terminated.set())
        return self

    def save(self) -> None:
        self.state.variable_values = [variable.numpy() for variable in self.variables]
        self.state.save(self.state_dir)

    def stop_part_way(self, done: EpochProgress, steps: int):
        """After SIGTERM: the state as it is after this step, saved, then Terminated."""
        self.state.epoch_progress = dataclasses.asdict(done)
        self.save()
        raise Terminated(f"Stopped by SIGTERM after batch {done.batches} of {steps} in epoch "
                         f"{self.state.epoch + 1}; the training state is saved in {self.state_dir}: run the same "
                         "command to continue from there.")

    def __exit__(self, kind, error, traceback) -> bool:
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.interrupted = True
            print(f"\nInterrupted: evaluating the best weights so far. The training state stays in "
                  f"{self.state_dir}: run the same command to continue.", file=sys.stderr)
            return True
        cluster_lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
        if kind is not None and issubclass(kind, cluster_lost) and self.multi_worker:
            # TensorFlow notices a crashed worker by its missing heartbeats and aborts the collective operations.
            raise UserError(f"another worker of the cluster stopped during epoch {self.state.epoch + 1}; every "
                            "worker's state after the last whole epoch is saved: start all workers again with "
                            "the same command to resume") from None
        return False


def logged_progress(what: str, steps: int):
    """In a log (not a terminal, which has the progress bar), on_batch for run_epoch: a line every
    StageProgress.LOG_EVERY seconds of a pass."""
    if sys.stdout.isatty():
        return None
    progress = StageProgress(what, steps, "batches", terminal=False, one="batch")
    return lambda index, loss: progress(index + 1)


def batch_reporter(log: TrainingLog, first_step: int, steps: int, done_batches: int):
    """What each training batch reports: its loss to TensorBoard, and in a log (not a terminal, which has the
    progress bar) a line of progress every StageProgress.LOG_EVERY seconds."""
    minutes = StageProgress("", steps, "batches", done_batches, terminal=False, one="batch")

    def on_batch(index, loss):
        log.batch(first_step + index + 1, loss)
        if not sys.stdout.isatty():
            minutes(index + 1)
    return on_batch


def end_epoch(state: TrainingState, scores: dict, seconds: float, classifier) -> None:
    """An epoch done: its figures and seconds into the state, and early stopping's count on the validation loss
    (a lower one keeps the weights as the best so far)."""
    state.epoch += 1
    state.epoch_progress = None
    state.epoch_seconds.append(seconds)
    for name, value in scores.items():
        state.history.setdefault(name, []).append(value)
    if scores["val_loss"] < state.best_loss:
        state.best_loss, state.best_epoch, state.wait = scores["val_loss"], state.epoch, 0
        state.best_weights = classifier.get_weights()
    else:
        state.wait += 1


def keep_best_weights(classifier, state: TrainingState) -> None:
    """The best weights back into the classifier at the end (those it started from if no epoch beat them)."""
    if state.best_weights is None:
        return
    if state.best_epoch == 0:
        print("Keeping the weights training started from: no epoch lowered their validation loss")
    else:
        print(f"Keeping the weights of epoch {state.best_epoch}, the lowest validation loss")
    classifier.set_weights(state.best_weights)


def train(classifier, optimizer, strategy, inputs: PreparedInputs, state: TrainingState, state_dir: Path,
          multi_worker: bool, log_dir: Path | None = None, steps: Steps | None = None) -> TrainingResult:
    """Train from `state` with early stopping on validation loss and keep the best weights. Checkpoints saves
    the state after every epoch (a crashed run continues from it); on Ctrl-C the loop stops and the best weights
    so far are kept; on SIGTERM (a scheduler's notice before it kills) the state after the current step is saved
    and Terminated raised, with no evaluation. With `log_dir`, the curves are logged for TensorBoard there.
    `steps` are the classifier's (build_step_functions) unless given (a test's stand-ins).

    One loop for every setup: the strategy runs each step on its replicas, whether that is this CPU, several
    GPUs or the workers of a cluster. Not Keras' fit(): in Keras 3.15 it fails under
    MultiWorkerMirroredStrategy (keras-team/keras#20585)."""

    step_functions = steps or build_step_functions(classifier, optimizer, strategy, inputs.class_weights)
    names = HISTORY_NAMES
    validation_batches = inputs.share.distribute(strategy, inputs.validation_batches, 0)
    resumed_after_epoch = state.epoch
    log = TrainingLog(log_dir)
    plan, steps = inputs.plan, inputs.plan.steps_per_epoch
    checkpoints = Checkpoints(state, state_dir, classifier.variables + optimizer.variables, multi_worker)
    try:
        with checkpoints:
            while state.epoch < plan.epochs and state.wait < plan.patience:
                resume = EpochProgress(**state.epoch_progress) if state.epoch_progress else EpochProgress()
                print(f"Epoch {state.epoch + 1}/{plan.epochs}" +
                      (f", from batch {resume.batches + 1}" if resume.batches else ""))
                started = time.perf_counter()
                bar = keras.utils.Progbar(steps, verbose=1 if sys.stdout.isatty() else 2, stateful_metrics=names)
                # Each epoch's batches come in the order of its own seed, so a resumed epoch skips those it has done.
                train_batches = inputs.share.distribute(strategy, inputs.training_batches(state.epoch), resume.batches)
                done = run_epoch(step_functions.train, train_batches, steps, bar, done=resume,
                                 stop=checkpoints.terminated.is_set, shown=names,
                                 on_batch=batch_reporter(log, state.epoch * steps, steps, resume.batches))
                done.seconds = resume.seconds + time.perf_counter() - started
                if checkpoints.terminated.is_set():
                    checkpoints.stop_part_way(done, steps)
                validation = run_epoch(step_functions.validation, validation_batches, inputs.validation_steps,
                                       on_batch=logged_progress("validation: ", inputs.validation_steps)).scores()
                scores = {**done.scores(), **{f"val_{name}": value for name, value in validation.items()}}
                scores = {name: scores[name] for name in names}
                bar.update(steps, list(scores.items()), finalize=True)
                end_epoch(state, scores, done.seconds, classifier)
                log.epoch(state.epoch, scores, float(optimizer.learning_rate))
                checkpoints.save()
            if state.wait >= plan.patience:
                print(f"Early stopping: no lower validation loss in the last {state.wait} epoch(s)")
    finally:
        log.close()
    keep_best_weights(classifier, state)
    return TrainingResult(state.history, state.epoch_seconds, state.epoch, state.best_epoch,
                          checkpoints.interrupted, resumed_after_epoch, plan)


# ----------------------------------------------------------------------------------------------------------
# Learning from unlabelled text: before the labels, the model learns the baseline's probabilities on the texts
# without them (teacher); then the labels fine-tune it. Every stage runs through the one training loop above,
# each with its own saved state.
# ----------------------------------------------------------------------------------------------------------


TEACHER_MIN_EPOCHS = 2  # the fewest planned epochs of the teacher stage
# After a teacher stage the labels fine-tune at a quarter of --learning-rate (5e-4 by default): chosen on the
# validation split at 2,000 IMDB labels, mean of seeds 42, 1, 2 (docs/RESULTS.md, "Unlabelled text").
FINE_TUNING_LEARNING_RATE_SCALE = 0.25
# With no unlabelled text the teacher teaches beside the labels (knowledge distillation): each training text's
# target is this share of its label plus the rest of the baseline's out-of-fold probability for it (the
# baseline fitted on the other TEACHER_FOLDS - 1 folds, so it never grades a text it has learned).
DISTILLATION_LABEL_SHARE = 0.5
TEACHER_FOLDS = 5
# Soft targets teach more slowly: the planned epochs and patience times this (4 -> 6 epochs on all of imdb.csv won
# on validation, 0.9138 against 0.9067 with the plan's 4; patience 1 -> 2 kept seed 2 from stopping at epoch 3,
# 0.9092 against 0.8986; docs/RESULTS.md). --epochs and --patience, if given, are kept.
DISTILLATION_EPOCH_SCALE = 1.5


@dataclass(frozen=True)
class SemiSupervised:
    method: str  # none or teacher
    reason: str  # why, in words (auto's choice, or as given)
    distils: bool = False  # teacher with no unlabelled text: the baseline's probabilities beside the labels

    @property
    def teaches(self) -> bool:
        return self.method == "teacher"

    @property
    def learns_from_unlabelled(self) -> bool:
        return self.method != "none" and not self.distils

    def shaping(self, recipe: BaselineRecipe) -> dict:
        """What the run learns from, for the resume check (the fingerprint's TARGETS): the method, and when the
        baseline teaches, the baseline's recipe and how its probabilities become targets. A run that resumes
        with --no-baseline or another --baseline-ngrams then learns from other targets, and is refused."""
        record = {"method": self.method, "distils": self.distils}
        if self.teaches:
            record["baseline"] = dataclasses.asdict(recipe)
        if self.distils:
            record.update(label_share=DISTILLATION_LABEL_SHARE, most_folds=TEACHER_FOLDS)
        return record


# auto distils (the teacher beside the labels) from this many training rows on: the smallest size where it was
# ahead of the plain run on validation beyond noise (seeds 42, 1 and 2 pooled, McNemar p = 0.00018 at 10,048
# training rows; also at 20,063 and on all of imdb.csv; under --preset best's blend too, seed 42); below it the
# plain run (at 5,031 the two were level, p = 0.16; docs/RESULTS.md).
AUTO_DISTILLATION_ROWS = 10_000


def choose_semi_supervised(method: str, arch: str, training_rows: int, unlabelled_texts: int,
                           has_baseline: bool, smallest_class: int = TEACHER_FOLDS) -> SemiSupervised:
    """--semi-supervised as given, or auto's choice from the sizes (measured on IMDB subsets, see
    docs/RESULTS.md): the teacher when there is unlabelled text, at least as much as labelled training text,
    and a baseline to teach; without that much unlabelled text, for the card's lstm on a large training split
    (AUTO_DISTILLATION_ROWS) with a baseline, the teacher beside the labels (distillation; --preset best too);
    else none, the plain run."""
    if method == "teacher":
        if not unlabelled_texts:
            return SemiSupervised("teacher", "as given; no unlabelled text, so the baseline's "
                                  "out-of-fold probabilities on the training split are learned beside the labels",
                                  distils=True)
        return SemiSupervised("teacher", "as given")
    if method == "none":
        return SemiSupervised("none", "as given" if unlabelled_texts else "no unlabelled text")
    if not has_baseline:
        return SemiSupervised("none", "auto: no baseline to teach (--no-baseline)" if unlabelled_texts
                              else "auto: no unlabelled text")
    if unlabelled_texts and unlabelled_texts >= training_rows:
        return SemiSupervised("teacher", f"auto: {unlabelled_texts} unlabelled texts for {training_rows} training "
                                         "rows")
    few = (f"fewer unlabelled texts ({unlabelled_texts}) than training rows ({training_rows})" if unlabelled_texts
           else "no unlabelled text")
    if arch == "lstm" and training_rows >= AUTO_DISTILLATION_ROWS and smallest_class >= TEACHER_FOLDS:
        return SemiSupervised("teacher", f"auto: {few}, so the baseline's out-of-fold probabilities on the training "
                                         f"split are learned beside the labels ({training_rows} training rows)",
                              distils=True)
    return SemiSupervised("none", f"auto: {few}")


def unlabelled_use(counts: dict, semi: SemiSupervised) -> dict:
    """The unlabelled texts' counts (gather_unlabelled's) with how many the run learns from: all those kept, or
    none when its method does not learn from unlabelled text, the reason then in words (`not_used`)."""
    used = counts["kept"] if semi.learns_from_unlabelled else 0
    record = {**counts, "used": used}
    if counts["kept"] and not used:
        record["not_used"] = (f"the baseline teaches beside the labels instead ({semi.reason})" if semi.distils
                              else f"--semi-supervised none learns from none of them ({semi.reason})")
    return record


def soft_targets(probabilities: np.ndarray) -> np.ndarray:
    """A teacher's (texts, classes) probabilities as the labels of the training loop: for two classes the
    positive class's probability (what the sigmoid learns), for more the whole row."""
    return counted_classes(probabilities.shape[1]).targets(probabilities)


def teacher_folds(labels: np.ndarray, num_classes: int) -> int:
    """How many folds grade the training split: TEACHER_FOLDS, or fewer when a class has fewer rows (each fold
    holds a row of every class)."""
    return min(TEACHER_FOLDS, int(np.bincount(labels, minlength=num_classes).min()))


def out_of_fold_probabilities(train_strings, labels: np.ndarray, num_classes: int,
                              recipe: BaselineRecipe) -> np.ndarray:
    """The baseline's probabilities (texts, classes) for each training text from a baseline fitted on the other
    folds (TEACHER_FOLDS, stratified, seeded), so no text is graded by a baseline that has seen its label."""
    folds = teacher_folds(labels, num_classes)
    if folds < 2:
        raise UserError("the teacher needs at least two training rows of each class to grade the training "
                        "split out of fold; use --semi-supervised none")
    strings, probabilities = np.asarray(train_strings, dtype=object), np.zeros((len(labels), num_classes))
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=recipe.seed).split(strings, labels))
    baselines = fit_baselines([(list(strings[fitted_on]), labels[fitted_on]) for fitted_on, _ in splits], recipe)
    for fold, ((_, graded), baseline) in enumerate(zip(splits, baselines), start=1):
        print(f"Teacher: the baseline of fold {fold} of {folds} grades its {len(graded)} training texts")
        probabilities[graded] = baseline.predict_proba(list(strings[graded]))
    return probabilities


def distilled_targets(labels: np.ndarray, teacher: np.ndarray, num_classes: int) -> np.ndarray:
    """Each training text's target beside its label: DISTILLATION_LABEL_SHARE of the label plus the rest of the
    teacher's probabilities (texts, classes): for two classes the positive class's share (what the sigmoid
    learns; the hard label is still on the same side of 0.5), for more a row of class shares."""
    one_hot = np.eye(num_classes)[labels]
    return soft_targets(DISTILLATION_LABEL_SHARE * one_hot + (1 - DISTILLATION_LABEL_SHARE) * teacher)


def teach_beside_the_labels(train_strings, rows: np.ndarray, train: LabelledTexts, baseline, standardize,
                            num_classes: int, recipe: BaselineRecipe):
    """The distilled targets of the training split and their record for metrics.json (the seconds are the
    run's timing, teacher_s). The texts of the baseline's sample (`rows`, cleaned: train_strings) are graded out
    of fold; the rest, which no baseline saw, by the run's baseline, a chunk at a time."""
    labels = train.labels
    graded = np.zeros((len(labels), num_classes))
    graded[rows] = out_of_fold_probabilities(train_strings, labels[rows], num_classes, recipe)
    others = np.setdiff1d(np.arange(len(labels)), rows)
    if len(others):
        print(f"Teacher: the baseline grades the {len(others)} training texts outside its sample")
        graded[others] = baseline_probabilities(baseline, train.texts.take(others), standardize)
    record = {"label_share": DISTILLATION_LABEL_SHARE, "folds": teacher_folds(labels[rows], num_classes),
              "graded_out_of_fold": len(rows),
              "out_of_fold_accuracy": round(float(np.mean(graded.argmax(axis=1) == labels)), 4)}
    print(f"Teacher: out-of-fold accuracy {record['out_of_fold_accuracy']:.4f} on the training split; the targets "
          f"are {DISTILLATION_LABEL_SHARE} label, {1 - DISTILLATION_LABEL_SHARE:g} baseline")
    return distilled_targets(labels, graded, num_classes), record


def distillation_inputs(inputs: PreparedInputs, targets: np.ndarray, asked: PlanAsked, seed: int,
                        replicas: int) -> PreparedInputs:
    """The labelled stage's inputs with the distilled targets in place of the labels: the same batches and
    validation split (true labels), and DISTILLATION_EPOCH_SCALE times the planned epochs and patience unless
    --epochs and --patience are given."""
    global_batch_size, plan = inputs.plan.batch_size * replicas, inputs.plan
    scaled = {name: math.ceil(getattr(plan, name) * DISTILLATION_EPOCH_SCALE) for name, given in
              (("epochs", asked.epochs), ("patience", asked.patience)) if given is None}
    if scaled:
        said = " and ".join(f"{value} {name}" for name, value in scaled.items())
        plan = dataclasses.replace(plan, **scaled, reason=f"{plan.reason}; {said} for soft targets "
                                                          f"({DISTILLATION_EPOCH_SCALE:g}x)")
        print(f"Plan for the distilled targets: {said} ({DISTILLATION_EPOCH_SCALE:g}x the planned "
              + " and ".join(f"{getattr(inputs.plan, name)}" for name in scaled) + ")")
    return dataclasses.replace(inputs, plan=plan, training_batches=inputs.share.epoch_batches(
        inputs.train_ids, targets, plan, seed))


def teacher_inputs(inputs: PreparedInputs, targets: np.ndarray, asked: PlanAsked, seed: int,
                   replicas: int) -> PreparedInputs:
    """The teacher stage's inputs: the unlabelled texts with the teacher's probabilities as their labels, planned
    like a training split of that size (`asked`: at least TEACHER_MIN_EPOCHS epochs, or --pretrain-epochs), with
    the same validation split (true labels) for early stopping, and no class weights."""
    no_more = ReviewIds.from_lengths(np.zeros(0, np.int32), np.zeros(0, np.int64), inputs.train_ids.max_length)
    plan = inputs.share.plan(asked, inputs.unlabelled_ids, no_more, replicas, inputs.train_ids.max_length)
    training_batches = inputs.share.epoch_batches(inputs.unlabelled_ids, targets, plan, seed)
    return dataclasses.replace(inputs, plan=plan, training_batches=training_batches, class_weights=None)


def fine_tuning_optimizer(recipe: OptimizerRecipe, plan: TrainingPlan, classifier, strategy):
    """The labelled stage's optimizer after a teacher stage: the same schedule over the labelled plan, from
    FINE_TUNING_LEARNING_RATE_SCALE times --learning-rate, so the labels adjust the taught weights gently."""
    gentle = dataclasses.replace(recipe, learning_rate=recipe.learning_rate * FINE_TUNING_LEARNING_RATE_SCALE)
    with strategy.scope():
        optimizer = build_optimizer(gentle, plan)
        optimizer.build(classifier.trainable_variables)
    return optimizer


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the test-set figures of every model, computed once, shared by the printout and the files
# ----------------------------------------------------------------------------------------------------------


def figure_names(class_names) -> tuple[str, ...]:
    return label_set(class_names).figures


def compute_metrics(labels, probabilities, class_names) -> dict:
    """Test-set figures from (reviews, classes) probabilities: those of figure_names(class_names), and for
    every model the confusion matrix and each class's precision, recall, F1 and support (two classes: also the
    decision threshold)."""

    predicted, classes, rules = predicted_labels(probabilities), list(range(len(class_names))), label_set(class_names)
    scores = {**rules.headline_scores(labels, predicted, probabilities),
              "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=classes).tolist(),
              **rules.decision_record}
    precision, recall, f1, support = metrics.precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                             zero_division=0)
    scores["per_class"] = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                  "support": int(support[i])} for i, name in enumerate(class_names)}
    return scores


def classification_report(labels, probabilities, class_names) -> str:
    return metrics.classification_report(labels, predicted_labels(probabilities), labels=range(len(class_names)),
                                         target_names=list(class_names), digits=4, zero_division=0)


def summary_table(scores: dict[str, dict], class_names) -> str:
    """One line per model: the figures of two classes, or accuracy and the averages of more; those with a 95%
    interval (accuracy, F1, ROC AUC) show it beside them."""
    names = label_set(class_names).table
    widths = {name: 24 if f"{name}_interval" in next(iter(scores.values())) else 12 for name in names}
    lines = [f"{'model':<12}" + "".join(f"{name:>{widths[name]}}" for name in names)]
    for model_name, model_scores in scores.items():
        lines.append(f"{model_name:<12}" + "".join(
            f"{with_interval(model_scores[name], model_scores.get(f'{name}_interval')):>{widths[name]}}"
            for name in names))
    return "\n".join(lines)


@dataclass
class Evaluation:
    """Every model's test-set results. The first model is the primary one: the saved model (the blend, or the
    neural model); the report, the table and errors.csv are about it."""
    labels: np.ndarray
    class_names: tuple[str, ...]
    probabilities: dict[str, np.ndarray]  # model name -> (reviews, classes)
    scores: dict[str, dict]               # with a 95% interval beside each headline figure (name_interval)
    comparisons: list[Comparison]         # the paired comparisons of the models on the test rows
    classification_report: str
    table: str

    @property
    def primary(self) -> str:
        return next(iter(self.probabilities))


def compared_pairs(probabilities: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """Which models are compared on the test rows: the neural model against the baseline, and a blend against
    each of its parts."""
    names = list(probabilities)
    if "baseline" not in names:
        return []
    neural = next(name for name in names if name not in ("blend", "baseline"))
    pairs = [(neural, "baseline")]
    if "blend" in names:
        pairs += [("blend", "baseline"), ("blend", neural)]
    return pairs


def evaluate(test: LabelledTexts, class_names, probabilities: dict[str, np.ndarray]) -> Evaluation:
    """Score each model's test probabilities (the primary model first): the figures, their 95% intervals (the
    bootstrap above) and the paired comparisons."""
    scores = {name: compute_metrics(test.labels, values, class_names) for name, values in probabilities.items()}
    drawn = bootstrap_figures(test.labels, probabilities, class_names)
    for name, figures in drawn.items():
        for figure, values in figures.items():
            scores[name][f"{figure}_interval"] = percentile_interval(values)
    comparisons = [compare_models(test.labels, probabilities[first], probabilities[second], (first, second), "test",
                                  drawn) for first, second in compared_pairs(probabilities)]
    report = classification_report(test.labels, next(iter(probabilities.values())), class_names)
    return Evaluation(test.labels, tuple(class_names), probabilities, scores, comparisons, report,
                      summary_table(scores, class_names))


def confident_errors(texts, labels, probabilities, class_names, limit: int = 100) -> pd.DataFrame:
    """The test reviews the model got wrong with the highest confidence. Two classes: ordered by the distance of
    the positive probability from the threshold (column probability_positive); more: by the probability of
    the predicted class (column probability_predicted)."""
    predicted = predicted_labels(probabilities)
    wrong = np.flatnonzero(predicted != labels)
    shown, name = shown_probability(probabilities[wrong])
    confidence = label_set(class_names).confidence(shown)
    order = np.argsort(-confidence, kind="stable")[:limit]
    chosen = wrong[order]
    return pd.DataFrame({
        "text": texts[chosen],
        "true_label": [class_names[label] for label in labels[chosen]],
        "predicted_label": [class_names[label] for label in predicted[chosen]],
        name: np.round(shown[order], 4),
    })


def build_metrics(settings: dict, started_from: dict, data: dict, training: TrainingResult,
                 evaluation: Evaluation, blend: Blend | None, check: ValidationCheck, notes: list[str], strategy,
                 role: ClusterRole | None, semi_supervised: dict) -> dict:
    """The run's metrics.json: the primary model's test results first, then each other model's; the data,
    settings, training, timing (filled in last) and environment."""

    primary = evaluation.primary
    return {
        "model": primary,
        "classes": list(evaluation.class_names),
        **({"blend_weight": blend.weight, "blend_chosen": blend.reason} if blend else {}),
        **({"validation_accuracy": blend.validation_accuracy} if blend and blend.validation_accuracy else {}),
        "test": evaluation.scores[primary],
        # The baseline, then the neural part of a blend, under their own names.
        **{name: scores for name, scores in evaluation.scores.items() if name != primary},
        "intervals": INTERVALS_METHOD.format(rows=len(evaluation.labels)),
        "comparisons": [comparison.summary() for comparison in evaluation.comparisons],
        "notes": notes,
        "validation": {"accuracy": check.accuracy(),
                       **({"comparison": compare_models(check.labels, check.neural, check.baseline,
                                                        ("neural", "baseline"), "validation").summary()}
                          if check.baseline is not None else {}),
                       "baseline_learning_curve": check.baseline_curve},
        "data": data,
        "config": settings,
        "started_from": started_from,
        "training": training.summary(),
        "semi_supervised": semi_supervised,
        "environment": {"python": platform.python_version(), "tensorflow": tf.__version__,
                        "machine": platform.platform(), "cpus": os.cpu_count(),
                        "strategy": strategy_name(strategy, role), "replicas": strategy.num_replicas_in_sync},
    }


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------


def display_available() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def plot_confusion_matrix(matrix, class_names, title: str):
    size = min(4.5 + 0.45 * max(0, len(class_names) - 2), 16)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    sns.heatmap(np.array(matrix), annot=len(class_names) <= 25, fmt="d", cmap="Blues", xticklabels=class_names,
                yticklabels=class_names, cbar=False, ax=axes)
    axes.set(xlabel="Predicted", ylabel="True", title=title)
    figure.tight_layout()
    return figure


def plot_roc_curves(labels, probabilities: dict[str, np.ndarray], class_names):
    """Two classes: one ROC curve per model, for the positive class. More: one curve per class, one-vs-rest, for
    the primary (first) model."""
    curves, title = label_set(class_names).roc_curves(labels, probabilities)
    figure, axes = plt.subplots(figsize=(5.5, 5) if len(curves) <= 4 else (7, 6))
    for name, (is_class, scores) in curves.items():
        false_positive, true_positive, _ = roc_curve(is_class, scores)
        auc = roc_auc_score(is_class, scores)
        axes.plot(false_positive, true_positive, label=f"{name} (AUC = {auc:.4f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set(xlabel="False positive rate", ylabel="True positive rate", title=title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def plot_history(history: dict, stage: str = "", row=None):
    """Loss and accuracy per epoch, training beside validation (into `row`, a pair of axes, if given)."""
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4)) if row is None else (None, row)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(epochs, history.get(metric, []), marker="o", label="training")
        axes.plot(epochs, history.get(f"val_{metric}", []), marker="o", label="validation")
        axes.set(xlabel="epoch", ylabel=metric, title=f"{stage}{metric} per epoch".capitalize())
        axes.set_xticks(epochs)
        axes.legend()
    if figure is not None:
        figure.tight_layout()
    return figure


LEARNING_CURVE_FIGURE = "learning_curve.png"


def plot_learning_curve(curve: list[dict]):
    """The baseline's validation accuracy against its training rows, each point with its 95% interval."""
    figure, axes = plt.subplots(figsize=(5.5, 4))
    rows = [point["training_rows"] for point in curve]
    accuracy = np.array([point["validation_accuracy"] for point in curve])
    bounds = np.array([point.get("interval", [value, value]) for point, value in zip(curve, accuracy)])
    axes.errorbar(rows, accuracy, yerr=[accuracy - bounds[:, 0], bounds[:, 1] - accuracy], marker="o", capsize=4)
    axes.set_xscale("log")
    axes.set_xticks(rows, [str(value) for value in rows])
    axes.minorticks_off()
    axes.set(xlabel="training rows (log scale)", ylabel="validation accuracy",
             title="The baseline's learning curve (95% intervals)")
    figure.tight_layout()
    return figure


def show_figures(show: bool) -> None:
    """Open the figures in windows if asked and able, then free them."""
    if show:
        try:
            plt.show()
        except Exception as error:  # A broken display must not lose a finished run.
            print(f"warning: could not show the figures: {error}", file=sys.stderr)
    plt.close("all")


def write_outputs(output_dir: Path, model, evaluation: Evaluation, history: dict, test: LabelledTexts,
                  show: bool, stage_figures: dict | None = None,
                  learning_curve: list[dict] | None = None) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Save the model (model.keras and saved_model/1/), the reports and the figures (`stage_figures`: a name
    and a function drawing it for each figure of a stage; with a baseline, its learning curve), each file whole
    (report.html and metrics.json come after, last). Returns the confident errors and the figures' paths."""

    if not show:
        matplotlib.use("Agg")
    primary = evaluation.primary
    _save_model(model, output_dir / "model.keras")
    write_saved_model(model, output_dir / "saved_model" / "1", evaluation.class_names)
    _write_text(output_dir / "classification_report.txt",
               f"Test set, model: {primary}\n\n{evaluation.classification_report}\n{evaluation.table}\n")
    history_frame = pd.DataFrame(history)
    history_frame.insert(0, "epoch", np.arange(1, len(history_frame) + 1))
    _write_csv(output_dir / "history.csv", history_frame)
    errors = confident_errors(test.texts, test.labels, evaluation.probabilities[primary], evaluation.class_names)
    _write_csv(output_dir / "errors.csv", errors)
    figures = {
        "confusion_matrix.png": plot_confusion_matrix(evaluation.scores[primary]["confusion_matrix"],
                                                      evaluation.class_names,
                                                      f"Confusion matrix ({primary}, test set)"),
        "roc_curve.png": plot_roc_curves(test.labels, evaluation.probabilities, evaluation.class_names),
        "training_history.png": plot_history(history),
    }
    figures.update({name: draw() for name, draw in (stage_figures or {}).items()})
    if learning_curve:
        figures[LEARNING_CURVE_FIGURE] = plot_learning_curve(learning_curve)
    for name, figure in figures.items():
        _save_figure(figure, output_dir / name)
    return errors, {name: output_dir / name for name in figures}


# ----------------------------------------------------------------------------------------------------------
# Explanations: how much each word of a text pushed the prediction, for predict --explain and the report
# ----------------------------------------------------------------------------------------------------------

EXPLAIN_STEPS = 32  # integrated-gradients steps from the all-zero embedding to the text's own


@dataclass
class Explanation:
    """Each word's push on one prediction, in probability units: positive scores push towards `towards` (the
    positive class of two, else the predicted class). With the neural model alone they add up to about
    p(text) - p(all-zero embeddings); the baseline's to exactly p(text) - p(empty text); a blend's are the
    blend-weighted sum of the two."""
    words: list[str]       # the text as the model reads it: standardized, split on spaces
    scores: np.ndarray     # one per word
    towards: str           # the class the scores are about


@dataclass
class Explainer:
    """The parts of a saved model that an explanation needs, found by their layer names."""
    vectorizer: object            # the neural model's TextVectorization (or WordPiece vectorizer)
    embedding: object             # its token embedding layer
    class_names: tuple[str, ...]
    gradients: object             # tf.function: (embedding vectors, target class) -> integrated gradients
    subword_pieces: list[str] | None = None  # a WordPiece vectorizer's vocabulary (None: whole words)
    special_ids: set = field(default_factory=set)  # BERT's [CLS] and [SEP]: not words of the text
    standardize: object = None    # the vectorizer's cleaning of text into words (text_standardizer)
    words_of: object = None       # BERT: its tokenizer's words of a text (None: the standardized words)
    neural_weight: float = 1.0    # the blend's weight of the neural model (1 without a baseline)
    ngram_index: dict | None = None   # the baseline's n-gram -> id (None without a baseline)
    ngram_lengths: int = 0
    tfidf: object = None          # the blend's TfidfLogistic layer: the baseline's TF-IDF and probabilities
    coef: np.ndarray | None = None    # its coefficients, for each n-gram's term


def model_layers(model) -> dict:
    """Every layer of a model by name, the layers of models inside it included (the outer name wins)."""
    found = {}

    def walk(layer):
        found.setdefault(layer.name, layer)
        for inner in getattr(layer, "layers", []):
            walk(inner)

    walk(model)
    return found


def integrated_gradients_function(probabilities_from_vectors):
    """A compiled function: integrated gradients of the classifier's probability of one class with respect to
    the embedding vectors of one text, from all-zero vectors (Sundararajan et al., 2017; the method of
    TensorFlow's integrated-gradients tutorial), summed over each vector: one attribution per token."""

    @tf.function(reduce_retracing=True)
    def attributions(vectors, target):
        alphas = tf.linspace(0.0, 1.0, EXPLAIN_STEPS + 1)[:, None, None]
        path = alphas * vectors[None]  # (steps + 1, tokens, dimensions)
        with tf.GradientTape() as tape:
            tape.watch(path)
            chosen = class_columns(probabilities_from_vectors(path))[:, target]
        gradients = tape.gradient(chosen, path)
        average = tf.reduce_mean((gradients[:-1] + gradients[1:]) / 2, axis=0)  # trapezoidal rule
        return tf.reduce_sum(average * vectors, axis=-1)

    return attributions


def explanation_split(model, classifier):
    """The classifier's token embedding and the rest as a function, from its architecture's explain (the
    architecture is the one the saved model's settings name)."""
    settings = next((layer.settings for layer in model_layers(model).values() if isinstance(layer, ClassNames)
                     and layer.settings), None) or {}
    architecture = ARCHITECTURES.get(settings.get("arch"))
    if architecture is None or architecture.explain is None:
        raise UserError(f"the model {classifier.name!r} (--arch {settings.get('arch', 'unknown')}) has no explain "
                        "function, so its predictions cannot be explained word by word")
    return architecture.explain(classifier)


def build_explainer(model, class_names) -> Explainer:
    """Find the neural model and, in a blend, the baseline's n-grams, weights and blend weight."""
    layers_by_name = model_layers(model)
    classifier = next((layer for name, layer in layers_by_name.items()
                       if name.endswith(CLASSIFIER_SUFFIX) and OUTPUT_LAYER in model_layers(layer)), None)
    if classifier is None or "vectorizer" not in layers_by_name:
        raise UserError("--explain needs a model saved by this script (its neural part was not found)")
    vectorizer = layers_by_name["vectorizer"]
    embedding, rest = explanation_split(model, classifier)
    explainer = Explainer(vectorizer, embedding, tuple(class_names), integrated_gradients_function(rest),
                          standardize=text_standardizer(vectorizer))
    if hasattr(vectorizer, "token_counts"):  # the WordPiece vectorizer (words or BERT)
        explainer.subword_pieces = vectorizer.get_vocabulary()
        explainer.special_ids = {getattr(vectorizer, "start_id", None), getattr(vectorizer, "end_id", None)} - {None}
    if hasattr(vectorizer, "words"):  # BERT's own tokenizer: its words, punctuation marks included
        explainer.words_of = vectorizer.words
    if "tfidf_logistic" in layers_by_name:
        if "blend" not in layers_by_name:
            raise UserError("--explain needs a blended model saved by a newer version of this script; "
                            "train it again")
        ngram_ids = layers_by_name["ngram_ids"]
        explainer.neural_weight = layers_by_name["blend"].weight
        explainer.ngram_index = {gram: index for index, gram in enumerate(ngram_ids.get_vocabulary()) if index > 1}
        ngrams = ngram_ids.get_config()["ngrams"]  # an int N (up to N words), or the n-gram lengths
        explainer.ngram_lengths = max(ngrams) if isinstance(ngrams, (tuple, list)) else int(ngrams)
        explainer.tfidf = layers_by_name["tfidf_logistic"]
        explainer.coef = np.asarray(explainer.tfidf.coef, dtype=np.float64)
    return explainer


def text_words(text: str, standardize) -> list[str]:
    """The words of a text as the model reads them (`standardize`: its vectorizer's, text_standardizer)."""
    return standardize(str(text)).numpy().decode("utf-8").split()


def neural_word_scores(explainer: Explainer, text: str, target: int, words: int) -> np.ndarray:
    """Integrated gradients of the neural model, one per word (words past --max-length get 0: unseen). With
    WordPiece tokens, a word's score is the sum of its pieces' (a piece marked ## continues a word)."""

    token_ids = np.asarray(explainer.vectorizer(tf.constant([[str(text)]])))[0]
    token_ids = token_ids[: np.count_nonzero(token_ids)]
    scores = np.zeros(words)
    if not len(token_ids):
        return scores
    vectors = explainer.embedding(tf.constant(token_ids[None]))[0]
    token_scores = explainer.gradients(tf.cast(vectors, tf.float32), tf.constant(target)).numpy()
    words_in_text = ~np.isin(token_ids, list(explainer.special_ids))
    token_ids, token_scores = token_ids[words_in_text], token_scores[words_in_text]
    if explainer.subword_pieces is None:
        word_of_token = np.arange(len(token_ids))
    else:
        word_of_token = np.cumsum([not explainer.subword_pieces[i].startswith("##") for i in token_ids]) - 1
    seen = word_of_token < words
    np.add.at(scores, word_of_token[seen], token_scores[seen])
    return scores


def baseline_word_scores(explainer: Explainer, words: list[str], target: int) -> np.ndarray:
    """The baseline's exact per-n-gram terms of its score, shared out among the words of each n-gram.

    The logistic regression's score (the logit; for several classes the target's logit minus the mean logit)
    is a sum of one term per distinct n-gram, its TF-IDF weight (the blend's own TfidfLogistic.ngram_weights)
    times its coefficient, plus the intercept. The terms are scaled by one factor so that they add up to
    p(text) - p(empty text) (the layer's probabilities), the probability units of the neural scores; each
    n-gram's share goes equally to its words, at each place it occurs."""
    places: dict[int, list[int]] = {}  # n-gram id -> where it starts, each time it occurs
    lengths: dict[int, int] = {}       # n-gram id -> its number of words
    for n in range(1, explainer.ngram_lengths + 1):
        for start in range(len(words) - n + 1):
            index = explainer.ngram_index.get(" ".join(words[start:start + n]))
            if index is not None:
                places.setdefault(index, []).append(start)
                lengths[index] = n
    scores = np.zeros(len(words))
    if not places:
        return scores
    ids = np.array(list(places))
    text = tf.constant(np.repeat(ids, [len(starts) for starts in places.values()])[None])  # each n-gram as often
    _, ngram, weights, norms = explainer.tfidf.ngram_weights(text)                        # as it occurs
    weight_of = dict(zip(ngram.numpy().tolist(), weights.numpy().astype(np.float64)))
    weights = np.array([weight_of[index] for index in ids.tolist()]) / max(float(norms[0]), 1e-12)
    probabilities, empty = (class_probabilities(explainer.tfidf(row))[0] for row in (text, tf.zeros((1, 1), tf.int64)))
    coef = explainer.coef[ids]  # scikit-learn keeps one row of coefficients for two classes
    terms = weights * (coef if coef.ndim == 1 else coef[:, target] - coef.mean(axis=1))
    change = probabilities[target] - empty[target]
    scale = float(change / terms.sum()) if abs(terms.sum()) > 1e-12 else 0.0
    for index, term, starts in zip(ids, terms, places.values()):
        length = lengths[index]
        for start in starts:
            scores[start:start + length] += scale * term / len(starts) / length
    return scores


def explained_class(probabilities: np.ndarray) -> int:
    """The class an explanation is about, from a text's row of probabilities: the positive class of two (so
    that scores read the same way for every text), else the predicted class."""
    return counted_classes(len(probabilities)).explained(probabilities)


def word_places(words: list[str], other_words: list[str]) -> np.ndarray:
    """For each of `words` the index of the word of `other_words` that holds its first letter, the two being
    splits of one text (the standardized words and BERT's). Both are compared on their letters, digits, ! and ?
    only, lowercased and without accents; where these differ (an [UNK]), by relative position."""
    def owners(word_list):  # the index of the word of each letter kept, in order
        owner = []
        for index, word in enumerate(word_list):
            kept = [char for char in unicodedata.normalize("NFD", word.lower()) if char.isalnum() or char in "!?"]
            owner += [index] * len(kept)
        return owner

    by_position = np.minimum(np.arange(len(words)) * len(other_words) // max(len(words), 1),
                             max(len(other_words) - 1, 0))
    mine, theirs = owners(words), owners(other_words)
    if len(mine) != len(theirs):
        return by_position
    places = by_position.copy()
    for position in range(len(mine) - 1, -1, -1):  # backwards, so each word ends at its first letter
        places[mine[position]] = theirs[position]
    return places


def explain_text(explainer: Explainer, text: str, target: int) -> Explanation:
    """Each word's push towards class `target` in the model's prediction for `text`."""
    standardized = text_words(text, explainer.standardize)
    words = standardized if explainer.words_of is None else explainer.words_of(text)
    scores = explainer.neural_weight * neural_word_scores(explainer, text, target, len(words))
    if explainer.ngram_index is not None:
        baseline = (1 - explainer.neural_weight) * baseline_word_scores(explainer, standardized, target)
        if explainer.words_of is None:
            scores += baseline
        else:
            np.add.at(scores, word_places(standardized, words), baseline)
    return Explanation(words, scores, explainer.class_names[target])


def strongest_words(explanation: Explanation, sign: int, limit: int = 5) -> str:
    """The words that pushed hardest towards (sign 1) or away from (sign -1) the explained class, each word's
    places added up: 'great (+0.2130); superb (+0.0412)'."""
    totals: dict[str, float] = {}
    for word, score in zip(explanation.words, explanation.scores):
        totals[word] = totals.get(word, 0.0) + float(score)
    chosen = sorted((item for item in totals.items() if item[1] * sign > 0), key=lambda item: -abs(item[1]))
    return "; ".join(f"{word} ({score:+.4f})" for word, score in chosen[:limit])


def explanation_lines(explanation: Explanation) -> list[str]:
    """word<TAB>score, one line per word in text order (what predict --explain prints into a pipe)."""
    return [f"{word}\t{score:+.4f}" for word, score in zip(explanation.words, explanation.scores)]


def coloured_text(explanation: Explanation, width: int = 100) -> str:
    """The text for a terminal: green words pushed towards the explained class, red ones away; bold for the
    strongest third, plain for the middle, dim for the weakest (relative to the strongest word of the text)."""
    strongest = max((abs(score) for score in explanation.scores), default=0.0) or 1.0
    coloured = []
    for word, score in zip(explanation.words, explanation.scores):
        strength = abs(score) / strongest
        if strength < 0.05:
            coloured.append(word)
            continue
        style = "1" if strength > 2 / 3 else "22" if strength > 1 / 3 else "2"
        coloured.append(f"\033[{style};{32 if score > 0 else 31}m{word}\033[0m")
    # Wrap on the plain words (escape codes take no room on screen), then colour the wrapped lines.
    lines, line, used = [], [], 0
    for plain, shown in zip(explanation.words, coloured):
        if line and used + 1 + len(plain) > width:
            lines.append(" ".join(line))
            line, used = [], 0
        used += len(plain) + (1 if line else 0)
        line.append(shown)
    if line:
        lines.append(" ".join(line))
    return "\n".join("    " + line for line in lines)


# ----------------------------------------------------------------------------------------------------------
# The one-page report: report.html, self-contained (figures embedded), to open in any browser or send on
# ----------------------------------------------------------------------------------------------------------

REPORT_MISTAKES = 20
REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.2em 0.8em; border: 1px solid #ddd; }
th { background: #f4f4f4; text-align: left; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 48%; border: 1px solid #eee; margin: 0.5em 0.5em 0.5em 0; vertical-align: top; }
img.wide { width: 97%; }
.mistake { margin: 1em 0; padding: 0.5em 0.8em; border-left: 4px solid #c33; background: #fafafa; }
.mistake .text { line-height: 1.7; } .small { color: #666; font-size: 0.9em; }
.note { margin: 0.5em 0; padding: 0.5em 0.8em; border-left: 4px solid #e0a000; background: #fff8e5; }
.side { display: flex; gap: 1em; align-items: flex-start; } .side img { width: 50%; }
"""


def html_table(header: list[str], rows: list[list]) -> str:
    """A table; numbers get 4 decimals and align right."""
    def cell(value):
        if isinstance(value, float):
            return f'<td class="number">{value:.4f}</td>'
        if isinstance(value, int) and not isinstance(value, bool):
            return f'<td class="number">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def embedded_image(path: Path, title: str, wide: bool = False) -> str:
    """A PNG file as an <img> that carries its own bytes (a data: URI), so the page needs no other file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(title)}" title="{html.escape(title)}"'
            f'{" class=wide" if wide else ""}>')


def highlighted_html(explanation: Explanation) -> str:
    """The words of a text with a green (towards the explained class) or red (away) background as strong as
    their push, relative to the strongest word; the score shows on hovering."""
    strongest = max((abs(score) for score in explanation.scores), default=0.0) or 1.0
    spans = []
    for word, score in zip(explanation.words, explanation.scores):
        alpha = min(1.0, abs(score) / strongest)
        colour = f"rgba(0,160,60,{alpha:.2f})" if score > 0 else f"rgba(220,40,40,{alpha:.2f})"
        spans.append(f'<span style="background:{colour}" title="{score:+.4f}">{html.escape(word)}</span>')
    return " ".join(spans)


def metric_rows(scores: dict[str, dict], class_names) -> list[list]:
    """Side by side: one row per figure, one column per model (the primary model first), with its 95% interval
    where it has one."""
    return [[name, *(with_interval(model_scores[name], model_scores.get(f"{name}_interval"))
                     for model_scores in scores.values())] for name in figure_names(class_names)]


def epoch_table(history: dict) -> str:
    """A row per epoch, a column per figure of `history`."""
    return html_table(["epoch", *history], [[epoch + 1, *(values[epoch] for values in history.values())]
                                            for epoch in range(len(history.get("loss", [])))])


def value_table(record: dict, header: str = "") -> str:
    """A two-column table of a record's names and values."""
    return html_table([header, "value"], [[name, value] for name, value in record.items()])


def title_section(report: dict, evaluation: Evaluation) -> list[str]:
    title = f"{report['model']} on {Path(report['config']['data']).name}"
    blend = f"; blend weight {report['blend_weight']:.2f} on the neural model" if "blend_weight" in report else ""
    return [f"<h1>Sentiment model report: {html.escape(title)}</h1>",
            f'<p class="small">Written {time.strftime("%Y-%m-%d %H:%M")}; classes: '
            f"{html.escape(', '.join(evaluation.class_names))}{html.escape(blend)}</p>"]


def notes_section(report: dict) -> list[str]:
    if not report["notes"]:
        return []
    return ["<h2>What to trust</h2>" + "".join(f'<p class="note">{html.escape(note)}</p>' for note in report["notes"])]


def metrics_section(report: dict, evaluation: Evaluation) -> list[str]:
    """The test-set figures side by side, the paired comparisons, and the validation accuracy."""
    sections = ["<h2>Test-set metrics</h2>",
                html_table(["metric", *evaluation.scores], metric_rows(evaluation.scores, evaluation.class_names)),
                f'<p class="small">In brackets: {html.escape(report["intervals"])}.</p>']
    if evaluation.comparisons:
        sections.append("<h2>Paired comparisons (test split)</h2>")
        sections.append(html_table(["models", "accuracy difference", "95% interval", "McNemar p", "verdict"],
                                   [[f"{c.first} against {c.second}", f"{100 * c.difference:+.1f} points",
                                     f"{100 * c.interval[0]:+.1f} to {100 * c.interval[1]:+.1f}", f"{c.p_value:.2g}",
                                     "level" if c.level else ("ahead" if c.difference > 0 else "behind")]
                                    for c in evaluation.comparisons]))
        sections.append("".join(f'<p class="note">{html.escape(c.sentence())}</p>' for c in evaluation.comparisons))
    accuracy = report["validation"]["accuracy"]
    sections.append('<p class="small">Validation accuracy: ' + html.escape(", ".join(
        f"{'the ' + report['config']['arch'] if name == 'neural' else 'the ' + name} {value:.4f}"
        for name, value in accuracy.items())) + "</p>")
    return sections


def learning_curve_section(curve: list[dict], figures: dict[str, Path]) -> list[str]:
    if not curve:
        return []
    table = html_table(["share of the training split", "training rows", "validation accuracy (95% interval)"],
                       [[f"{point['share']:.0%}", point["training_rows"],
                         with_interval(point["validation_accuracy"], point.get("interval"))] for point in curve])
    picture = (embedded_image(figures[LEARNING_CURVE_FIGURE], LEARNING_CURVE_FIGURE)
               if LEARNING_CURVE_FIGURE in figures else "")
    return ["<h2>The baseline's learning curve</h2>",
            '<p class="small">The baseline fitted again on a share of the training split and scored on the '
            "validation split: a curve still rising at the right means more labelled data would help.</p>",
            f'<div class="side">{table}{picture}</div>']


def figures_section(evaluation: Evaluation, figures: dict[str, Path], history: dict) -> list[str]:
    """The primary model's per-class figures, the figures, and the labelled stage's epochs."""
    per_class = evaluation.scores[evaluation.primary]["per_class"]
    return [f"<h2>Per class ({html.escape(evaluation.primary)})</h2>",
            html_table(["class", "precision", "recall", "f1", "support"],
                       [[name, *values.values()] for name, values in per_class.items()]),
            "<h2>Figures</h2>" + "".join(embedded_image(path, name, wide="history" in name)
                                         for name, path in figures.items() if name != LEARNING_CURVE_FIGURE),
            "<h2>Learning curves</h2>" + epoch_table(history)]


def mistakes_section(mistakes: list[tuple[dict, Explanation]], primary: str) -> list[str]:
    sections = [f"<h2>The {len(mistakes)} most confident mistakes ({html.escape(primary)})</h2>"]
    if mistakes:
        sections.append('<p class="small">Green words pushed towards the class named in each box, red words '
                        "away from it; stronger colour, stronger push.</p>")
    for row, explanation in mistakes:
        sections.append(
            f'<div class="mistake"><div class="small">true: <b>{html.escape(row["true_label"])}</b>, predicted: '
            f'<b>{html.escape(row["predicted_label"])}</b>, {html.escape(row["probability_name"])} '
            f'{row["probability"]:.4f}; colours: towards <b>{html.escape(explanation.towards)}</b></div>'
            f'<div class="text">{highlighted_html(explanation)}</div></div>')
    return sections


def run_section(report: dict) -> list[str]:
    """The data's counts, the settings and the training's record."""
    sections = ["<h2>Data</h2>", value_table(report["data"]), "<h2>Settings</h2>",
                value_table(report["config"], "setting")]
    if report.get("training"):
        sections += ["<h2>Training</h2>", value_table(report["training"])]
    return sections


def time_section(report: dict, timing: dict) -> list[str]:
    """Each stage's seconds so far, and the environment."""
    return ["<h2>Time</h2>", html_table(["stage", "seconds"], [[name, value] for name, value in timing.items()
                                                               if not isinstance(value, list)]),
            "<h2>Environment</h2>", value_table(report["environment"])]


def build_html_report(report: dict, evaluation: Evaluation, history: dict, figures: dict[str, Path],
                      mistakes: list[tuple[dict, Explanation]], timing: dict, stage_sections: list[str]) -> str:
    """The page, section by section: what to trust, metrics side by side, the baseline's learning curve, the
    per-class figures and figures, the most confident mistakes with each word coloured by its push (see
    Explanation), the data and settings, the stages' own sections and the time of each stage so far."""
    title = f"{report['model']} on {Path(report['config']['data']).name}"
    sections = [*title_section(report, evaluation), *notes_section(report), *metrics_section(report, evaluation),
                *learning_curve_section(report["validation"]["baseline_learning_curve"], figures),
                *figures_section(evaluation, figures, history), *mistakes_section(mistakes, evaluation.primary),
                *run_section(report), *stage_sections, *time_section(report, timing)]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{REPORT_STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def unexplained(text: str, standardize, towards: str) -> Explanation:
    """A text's words with no scores (shown without colours)."""
    words = text_words(text, standardize)
    return Explanation(words, np.zeros(len(words)), towards)


def report_mistakes(model, errors: pd.DataFrame, class_names) -> list[tuple[dict, Explanation]]:
    """The first REPORT_MISTAKES rows of errors.csv, each with the explanation of the model's prediction (all
    scores 0, so no colours, for a model that --explain cannot explain)."""
    try:
        explainer = build_explainer(model, class_names)
    except UserError:
        explainer = None
    standardize = text_standardizer(model_layers(model)["vectorizer"])
    probability_name = next(column for column in errors.columns if column.startswith("probability"))
    mistakes = []
    for _, row in errors.head(REPORT_MISTAKES).iterrows():
        target = label_set(class_names).explained_named(row["predicted_label"])
        mistakes.append(({"true_label": row["true_label"], "predicted_label": row["predicted_label"],
                          "probability_name": probability_name.replace("_", " "),
                          "probability": float(row[probability_name])},
                         explain_text(explainer, row["text"], target) if explainer else
                         unexplained(row["text"], standardize, class_names[target])))
    return mistakes


def open_report(path: Path) -> None:
    """Open the report in the browser (where there is a display; a failure only warns)."""
    try:
        webbrowser.open(path.resolve().as_uri())
    except Exception as error:
        print(f"warning: could not open {path} in a browser: {error}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Before a run: the checks that need no data, the baseline's fit, scoring and the model to save
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunSetup:
    """What is settled before any data is read: what the run derives from the flags, this process's role and
    where it writes (a saved state there already checked against the flags)."""
    derived: Derived
    fingerprint: dict             # training_fingerprint: what the cache of token ids and a saved state must match
    role: ClusterRole | None
    output_dir: Path
    state_dir: Path
    started_from: dict            # the pretrained checkpoint or word vectors the model starts from
    architecture: Architecture    # the --arch record

    @property
    def writes_outputs(self) -> bool:
        return self.role is None or self.role.chief


def starting_point(recipe: ModelRecipe, embeddings: str, derived: Derived, architecture: Architecture) -> dict:
    """Which pretrained weights (the recipe's checkpoint) or word vectors (--embeddings) the model starts from,
    for metrics.json and the saved model."""
    if architecture.checkpoint is not None:
        return architecture.checkpoint(recipe)
    if embeddings in EMBEDDING_METHODS:
        return {"embeddings": embeddings, "vectors": "Word2Vec trained on this run's training split"
                if embeddings == "word2vec" else "random"}
    path = Path(derived.embeddings)
    return {"embeddings": embeddings, "vectors": str(path.resolve()), "file_bytes": path.stat().st_size,
            "dimensions": derived.embedding_dim}


def read_files(data: str, share: DataShare) -> list[Path]:
    """The files of --data this process reads: all of them, or in a divided cluster a worker's own (the chief
    reads them all)."""
    files = data_files(data)
    return [files[index] for index in share.files()] if share.takes_chiefs else files


def set_up_run(config: TrainConfig, cleanup: contextlib.ExitStack) -> RunSetup:
    """Every check that needs no data, so a mistake costs seconds: the flags, TF_CONFIG, the output directory
    (locked for this run until `cleanup` closes) and a saved training state."""
    architecture = ARCHITECTURES[config.arch]
    validate_config(config, architecture)
    derived = Derived.of(config, architecture)
    role = _cluster_role()
    if role and config.cpu_replicas > 1:
        raise UserError("--cpu-replicas cannot be combined with TF_CONFIG: each worker uses its own devices")
    if role and several_files(config.data) and len(data_files(config.data)) < role.workers:
        raise UserError(f"--data has {len(data_files(config.data))} file(s) for {role.workers} workers: each worker "
                        f"trains on its own files, so it needs at least {role.workers} (or give one file, which "
                        "every worker reads whole)")
    output_dir = _prepare_output_dir(Path(config.output_dir))
    cleanup.enter_context(_output_lock(output_dir, "run" if not role or role.chief else role.name))
    # Every worker of a cluster keeps its own training state; only the chief writes the outputs.
    state_dir = output_dir / ("training_state" if not role or role.chief else f"training_state-{role.name}")
    if config.fresh:
        shutil.rmtree(state_dir, ignore_errors=True)
    fingerprint = training_fingerprint(config, derived, read_files(config.data, DataShare.before_reading(
        role, config.data, None)))
    TrainingState.load(state_dir, fingerprint)  # refused now if saved with other flags; its targets once known
    started_from = starting_point(ModelRecipe.of(config), config.embeddings, derived, architecture)
    return RunSetup(derived, fingerprint, role, output_dir, state_dir, started_from, architecture)


def fit_the_baseline(recipe: BaselineRecipe | None, blends: bool, splits: DataSplits, standardize,
                     clock: Stopwatch):
    """The baseline of `recipe` fitted, the training texts it was fitted on, cleaned by the model's
    `standardize`, and their rows in the training split (baseline_sample: at most --baseline-rows); None, None,
    None without a recipe (--no-baseline). `blends`: --blend-weight needs it."""
    if recipe is None:
        return None, None, None
    rows = baseline_sample(splits.train.labels, recipe)
    sample = (f" on a sample of {len(rows)} of the {len(splits.train.labels)} training texts (--baseline-rows)"
              if len(rows) < len(splits.train.labels) else "")
    print(f"Fitting the TF-IDF + logistic-regression baseline{sample} ...")
    with clock.timed("baseline_s"):
        train_strings = standardized_strings(splits.train.texts[rows], standardize)
        try:
            return fit_baseline(train_strings, splits.train.labels[rows], recipe), train_strings, rows
        except ValueError as error:  # scikit-learn's "empty vocabulary": no word is in two training texts
            problem = f"the baseline cannot be fitted on these texts ({one_line(error, 100)})"
    if blends:
        raise UserError(f"{problem}, so there is nothing to blend with: drop --blend-weight (or --preset best)")
    print(f"warning: {problem}; going on without it", file=sys.stderr)
    return None, None, None


def blend_if_asked(blend_weight: float | str | None, arch: str, baseline, check: ValidationCheck) -> Blend | None:
    """The blend's weight, with --blend-weight (and a baseline), chosen on the validation split."""
    if baseline is None or blend_weight is None:
        return None
    blend = choose_blend(blend_weight, arch, check.labels, check.neural, check.baseline)
    print(f"Blend: {blend.weight:.2f} * {arch} + {1 - blend.weight:.2f} * baseline ({blend.reason})")
    return blend


def score_on_test(arch: str, classifier, baseline, blend: Blend | None, test_ids: ReviewIds,
                  test: LabelledTexts, standardize, clock: Stopwatch) -> dict[str, np.ndarray]:
    """Test-set probabilities of every model, the primary one (the blend, if any) first. Every choice (epochs,
    blend weight) was made on the validation split; the test split is only scored."""
    with clock.timed("evaluate_s"):
        neural = predict_token_ids(classifier, test_ids)
    if baseline is None:
        return {arch: neural}
    with clock.timed("baseline_s"):
        baseline_test = baseline_probabilities(baseline, test.texts, standardize)
    if blend is None:
        return {arch: neural, "baseline": baseline_test}
    return {"blend": blend_probabilities(blend.weight, neural, baseline_test), "baseline": baseline_test,
            arch: neural}


def model_to_save(settings: dict, started_from: dict, vectorizer, classifier, baseline, blend: Blend | None,
                  class_names):
    """The one model from raw strings to class probabilities that is saved: the classifier behind its
    tokenizer, or the blend with the baseline; the settings (run_settings) and the starting point inside."""
    settings = {**settings, "started_from": started_from}
    model = build_predictor(vectorizer, classifier, class_names, settings)
    return model if blend is None else build_blend_predictor(model, baseline, blend.weight, class_names, settings)


# ----------------------------------------------------------------------------------------------------------
# The stages of a run: each trains the model once through the one training loop, from its own resumable state,
# and says what it did (its record in metrics.json, its notes, its report section, its figure). A run is a short
# list of them chosen once from the flags and the data's sizes (choose_stages), the labelled stage last: a new way
# to learn is a new stage class and an entry there.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the stages of a run share: the flags, the data, what was prepared from it, and the baseline, fitted
    once when it is first needed (by a teacher, or to score beside the model)."""
    config: TrainConfig
    setup: RunSetup
    clock: Stopwatch
    data: LoadedData
    splits: DataSplits
    unlabelled: UnlabelledTexts
    semi: SemiSupervised
    counts: dict                       # data_summary's
    fingerprint: dict                  # the setup's, with the TARGETS the run learns from
    saved_state: TrainingState | None  # the labelled stage's, when the run resumes
    strategy: object = None
    inputs: PreparedInputs | None = None  # the prepared token ids, before any stage shapes its own
    cache: InputsCache | None = None
    standardize: object = None         # the model's text cleaning, for the baseline too
    share: DataShare = field(default_factory=lambda: DataShare())  # this process's training texts
    fitted: tuple | None = field(default=None, repr=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.data.classes.names

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def log_dir(self, stage: str = "") -> Path | None:
        """Where TensorBoard's curves go (a stage's under its own name); None on a worker that is not the chief."""
        if not self.setup.writes_outputs:
            return None
        return self.setup.output_dir / "tensorboard" / stage if stage else self.setup.output_dir / "tensorboard"

    def baseline(self):
        """The fitted baseline, the training texts it was fitted on and their rows (fit_the_baseline), fitted on
        first use; the data's counts say how many texts it saw."""
        if self.fitted is None:
            config = self.config
            self.fitted = fit_the_baseline(BaselineRecipe.of(config) if config.baseline else None,
                                           config.blend_weight is not None, self.splits, self.standardize, self.clock)
            if self.fitted[2] is not None:
                self.counts["baseline_fitted_on"] = len(self.fitted[2])
        return self.fitted

    def teacher(self):
        """The baseline as a teacher, which must be there: (baseline, its training texts, their rows)."""
        baseline, train_strings, rows = self.baseline()
        if baseline is None:
            raise UserError(f"the baseline, which is the teacher of --semi-supervised {self.semi.method}, cannot be "
                            "fitted on these texts; use --semi-supervised none")
        return baseline, train_strings, rows


def taught_notes(stage: str, run: Run, check: ValidationCheck) -> list[str]:
    """After a teacher: whether the model reached its teacher on validation (`stage` says how it was taught)."""
    arch = run.config.arch
    if check.baseline is None:
        return []
    behind = compare_models(check.labels, check.baseline, check.neural, ("baseline", arch), "validation")
    if behind.difference <= 0 or behind.level:
        return []
    accuracy = check.accuracy()
    return [f"{stage} did not bring the {arch} up to the baseline on the validation split ({accuracy['neural']:.4f} "
            f"against the baseline's {accuracy['baseline']:.4f}; the baseline is {behind.words()})."]


class Stage:
    """One stage of a run. `prepare` makes what it needs before the model is built; `train` trains the model
    (after `before`, the stage that ran first, if any); `hand_over` is the state the next stage starts from;
    the rest say what it did: its part of metrics.json's semi_supervised, of started_from, its notes, its
    report section (from its record) and its figures (a name and a function that draws it)."""
    state_name = ""  # its state directory under the run's ("": the run's own)
    result: TrainingResult | None = None

    def state_dir(self, run: Run) -> Path:
        return run.setup.state_dir / self.state_name if self.state_name else run.setup.state_dir

    def train_from(self, run: Run, classifier, optimizer, state: TrainingState) -> TrainingResult:
        """Its inputs through the training loop from `state`, saved in its state directory after every epoch
        (the same command resumes it), its curves under its name in TensorBoard's directory."""
        if run.setup.role is not None:
            check_workers_agree(run.strategy, state.epoch)
        return train(classifier, optimizer, run.strategy, self.inputs, state, self.state_dir(run),
                     multi_worker=run.setup.role is not None, log_dir=run.log_dir(self.state_name))

    def prepare(self, run: Run) -> None:
        pass

    def train(self, run: Run, classifier, optimizer, before: Stage | None) -> TrainingResult:
        raise NotImplementedError

    def hand_over(self, fingerprint: dict) -> TrainingState:
        return TrainingState(fingerprint=fingerprint)

    def record(self) -> dict:
        return {}

    def started_from(self, run: Run) -> dict:
        return {}

    def notes(self, run: Run, check: ValidationCheck, training: TrainingResult) -> list[str]:
        return []

    def report_section(self, record: dict) -> list[str]:
        return []

    def figures(self) -> dict:
        return {}


class TeacherStage(Stage):
    """Before the labels: the model learns the baseline's probabilities on the unlabelled texts (teacher_inputs),
    with a fresh optimizer and its own state; the labelled stage starts from the weights it ends with, which
    count as its epoch 0 (early stopping keeps them unless an epoch on the labels lowers their validation loss)."""
    state_name = "pretraining"

    def prepare(self, run: Run) -> None:
        baseline, _, _ = run.teacher()
        with run.clock.timed("teacher_s"):
            targets = soft_targets(baseline_probabilities(baseline, run.unlabelled.texts, run.standardize))
        config = run.config
        asked = PlanAsked(config.batch_size, config.pretrain_epochs, TEACHER_MIN_EPOCHS, None, word2vec=False)
        self.inputs = teacher_inputs(run.inputs, targets, asked, config.seed, run.replicas)
        self.texts, self.tokens = (int(value) for value in run.share.summed(np.array(  # the cluster's
            [len(run.inputs.unlabelled_ids), review_lengths(run.inputs.unlabelled_ids).sum()])))

    def train(self, run: Run, classifier, optimizer, before: Stage | None) -> TrainingResult:
        plan, state_dir = self.inputs.plan, self.state_dir(run)
        print(f"Teacher stage: {plan.epochs} epochs of {plan.steps_per_epoch} batches of {plan.batch_size} on "
              f"{self.texts} unlabelled texts with the baseline's probabilities, patience {plan.patience}")
        with run.strategy.scope():
            optimizer = build_optimizer(OptimizerRecipe.of(run.config), plan)
            optimizer.build(classifier.trainable_variables)
        saved = TrainingState.load(state_dir, run.fingerprint)
        self.state = restore_training_state(classifier, optimizer, saved, run.fingerprint, state_dir)
        started = time.perf_counter()
        with run.clock.timed("pretrain_s"):
            self.result = self.train_from(run, classifier, optimizer, self.state)
        self.seconds = time.perf_counter() - started
        self.result.tokens_per_epoch = self.tokens
        return self.result

    def hand_over(self, fingerprint: dict) -> TrainingState:
        state = TrainingState(fingerprint=fingerprint)
        if self.state.best_weights is not None:
            state.best_loss, state.best_epoch, state.best_weights = (self.state.best_loss, 0,
                                                                     self.state.best_weights)
        return state

    def record(self) -> dict:
        history = self.result.history
        best = (self.result.best_epoch or self.result.epochs_run) - 1
        return {"teacher": "the TF-IDF baseline (its probabilities on the unlabelled texts)", "texts": self.texts,
                "tokens": self.tokens, **self.result.summary(), "seconds": round(self.seconds, 2), "history": history,
                "validation_accuracy": history["val_accuracy"][best] if history.get("val_accuracy") else None}

    def started_from(self, run: Run) -> dict:
        start = {"pretrained": f"taught by the TF-IDF baseline's probabilities on {self.texts} unlabelled texts"}
        if run.config.embeddings == "word2vec":
            start["vectors"] = f"Word2Vec trained on this run's training split and {self.texts} unlabelled texts"
        return start

    def notes(self, run: Run, check: ValidationCheck, training: TrainingResult) -> list[str]:
        kept = (["Fine-tuning on the labels did not lower the validation loss of the model the teacher stage ended "
                 "with; that model is kept."] if training.best_epoch == 0 else [])
        return kept + taught_notes("The teacher stage", run, check)

    def report_section(self, record: dict) -> list[str]:
        if not record.get("history"):
            return []
        return ["<h2>Unlabelled text: the teacher stage</h2>",
                '<p class="small">Before the labels, the model learned the baseline\'s probabilities on the '
                "unlabelled texts (accuracy here: agreement with the baseline; validation: the true labels of the "
                "validation split).</p>",
                value_table({name: value for name, value in record.items() if name != "history"}),
                epoch_table(record["history"])]

    def figures(self) -> dict:
        return {"pretraining_history.png": lambda: plot_history(self.result.history, "teacher stage: ")}


class LabelledStage(Stage):
    """The labels: the stage every run ends with, into the run's own state directory. After a teacher stage
    it starts from what that stage hands over, at FINE_TUNING_LEARNING_RATE_SCALE times --learning-rate."""
    fine_tuning_learning_rate: float | None = None

    def prepare(self, run: Run) -> None:
        self.inputs = run.inputs

    def train(self, run: Run, classifier, optimizer, before: Stage | None) -> TrainingResult:
        if before is not None:
            optimizer = fine_tuning_optimizer(OptimizerRecipe.of(run.config), self.inputs.plan, classifier,
                                              run.strategy)
            self.fine_tuning_learning_rate = run.config.learning_rate * FINE_TUNING_LEARNING_RATE_SCALE
        if run.saved_state is not None:
            state = restore_training_state(classifier, optimizer, run.saved_state, run.fingerprint,
                                           run.setup.state_dir)
        else:
            state = (before or self).hand_over(run.fingerprint)
        with run.clock.timed("train_s"):
            self.result = self.train_from(run, classifier, optimizer, state)
        self.result.tokens_per_epoch = int(review_lengths(self.inputs.train_ids).sum())
        return self.result

    def record(self) -> dict:
        rate = self.fine_tuning_learning_rate
        return {} if rate is None else {"fine_tuning_learning_rate": rate}

    def notes(self, run: Run, check: ValidationCheck, training: TrainingResult) -> list[str]:
        rows, config = run.counts["train"], run.config
        if (run.semi.method != "none" or not run.semi.reason.endswith("no unlabelled text")
                or rows >= SMALL_TRAINING_ROWS or run.setup.architecture.checkpoint or not config.baseline):
            return []
        return [f"Few labels ({rows} training rows): unlabelled text of the same kind would likely help. Rows of "
                "--data with a text and an empty label, or --unlabelled FILE (a CSV or one text per line), let the "
                "model learn the baseline's probabilities on them first (README: Unlabelled text)."]

    def report_section(self, record: dict) -> list[str]:
        if record.get("history"):  # a teacher stage's section says it
            return []
        return [f'<p class="small">Unlabelled text: {html.escape(record["method"])} '
                f'({html.escape(record["chosen"])})</p>']


class DistilledStage(LabelledStage):
    """The labelled stage with the teacher beside the labels: each training text's target mixes its label
    with the baseline's out-of-fold probability for it (teach_beside_the_labels), over a longer plan for soft
    targets (distillation_inputs)."""

    def prepare(self, run: Run) -> None:
        baseline, train_strings, rows = run.teacher()
        with run.clock.timed("teacher_s"):
            targets, self.distillation = teach_beside_the_labels(train_strings, rows, run.splits.train, baseline,
                                                                 run.standardize, len(run.class_names),
                                                                 BaselineRecipe.of(run.config))
        self.inputs = distillation_inputs(run.inputs, targets, PlanAsked.of(run.config), run.config.seed,
                                          run.replicas)

    def record(self) -> dict:
        return {**super().record(), "distillation": self.distillation}

    def started_from(self, run: Run) -> dict:
        share = self.distillation["label_share"]
        return {"taught": f"labels beside the TF-IDF baseline's out-of-fold probabilities on the training split "
                          f"({share} label, {round(1 - share, 2)} baseline)"}

    def notes(self, run: Run, check: ValidationCheck, training: TrainingResult) -> list[str]:
        return taught_notes("Learning the baseline's probabilities beside the labels", run, check)

    def report_section(self, record: dict) -> list[str]:
        return ["<h2>The teacher beside the labels</h2>",
                '<p class="small">With no unlabelled text, each training text\'s target was its label mixed with the '
                "baseline's probability for it, graded by a baseline fitted on the other folds (knowledge "
                "distillation).</p>",
                value_table(record["distillation"]), *super().report_section(record)]


def choose_stages(semi: SemiSupervised) -> list[Stage]:
    """The run's stages in order, from how it learns from unlabelled text (choose_semi_supervised)."""
    if semi.distils:
        return [DistilledStage()]
    if semi.teaches:
        return [TeacherStage(), LabelledStage()]
    return [LabelledStage()]


def train_stages(run: Run, stages: list[Stage], classifier, optimizer) -> TrainingResult:
    """Each stage in turn, each after the one before; the labelled stage's result, or an earlier stage's if
    Ctrl-C stopped it (the model as it is is then reported). A finished run leaves no state to resume."""
    resuming = any((stage.state_dir(run) / "state.json").is_file() for stage in stages)
    clear_old_curves(run.log_dir(), resuming=resuming)
    before = None
    for stage in stages:
        training = stage.train(run, classifier, optimizer, before)
        if training.interrupted:
            break
        before = stage
    else:
        shutil.rmtree(run.setup.state_dir, ignore_errors=True)
    run.clock.record("epoch_s", training.epoch_seconds)
    return training


# ----------------------------------------------------------------------------------------------------------
# The training run: the story of a run, stage by stage
# ----------------------------------------------------------------------------------------------------------


def texts_file(setup: RunSetup, config: TrainConfig, cleanup: contextlib.ExitStack, share: DataShare) -> Path:
    """Where pass one writes the texts of --data: OUTPUT_DIR/.STATE_DIR.texts.utf8 (like the lock, one per run
    and role), once twice the bytes of the files this process reads fit (Latin-1 text can double in UTF-8);
    removed when the run ends, however it ends."""
    needed = 2 * sum(path.stat().st_size for path in read_files(config.data, share) if path.is_file())
    _check_free_space(setup.output_dir, needed)
    path = setup.output_dir / f".{setup.state_dir.name}.texts.utf8"

    def remove():
        with contextlib.suppress(OSError):  # (Windows keeps a file that is still open: the next run replaces it)
            path.unlink(missing_ok=True)
    cleanup.callback(remove)
    return path


def the_data_in_words(config: TrainConfig, data: LoadedData, splits: DataSplits,
                      unlabelled: UnlabelledTexts) -> tuple[SemiSupervised, dict, str]:
    """How the run learns from unlabelled text (auto's choice needs the sizes), the data's counts, and the
    summary line's words after "Read N rows"."""
    smallest_class = int(np.bincount(splits.train.labels, minlength=len(data.classes.names)).min())
    semi = choose_semi_supervised(config.semi_supervised, config.arch, len(splits.train.labels), len(unlabelled.texts),
                                  config.baseline, smallest_class)
    counts = data_summary(data, splits, unlabelled_use(unlabelled.counts, semi))
    return semi, counts, (f"dropped {counts['dropped']}; train {counts['train']}, validation "
                          f"{counts['validation']}, test {counts['test']}; {describe_unlabelled(counts['unlabelled'])}; "
                          f"{describe_classes(data)}")


def read_the_data(config: TrainConfig, setup: RunSetup, clock: Stopwatch, cleanup: contextlib.ExitStack,
                  strategy) -> Run:
    """Load and split the data, gather the unlabelled texts and choose how they are used (auto's choice needs
    the sizes), say so; then a saved state must have learned from the same. (The devices' `strategy` comes
    first: a cluster's workers agree on the data through it.)"""
    share = DataShare.before_reading(setup.role, config.data, strategy)
    with clock.timed("load_s"):
        store = texts_file(setup, config, cleanup, share)
        if share.takes_chiefs:  # a worker that reads only its own files, as the chief says
            plan = share.plan_from_chief()
            data, splits, unlabelled = load_share(config, store, share.files(), plan)
            semi, counts = SemiSupervised(**plan.record["semi"]), plan.record["counts"]
            numbers = ", ".join(str(number + 1) for number in share.files())
            print(f"Read {data.rows_read} rows from this worker's files ({numbers}) of {config.data}; of all the "
                  f"files, as the chief counts them: {plan.record['summary']}")
        else:
            data = load_dataset(config, store, keep_places=share.divided)
            splits = split_dataset(data, config.test_fraction, config.validation_fraction, config.seed)
            unlabelled = gather_unlabelled(data, splits, config.unlabelled, config.text_column)
            semi, counts, summary = the_data_in_words(config, data, splits, unlabelled)
            print(f"Read {counts['rows_read']} rows from {config.data}; {summary}")
            if share.divided:
                share.plan_from_chief(WorkersPlan.of(data, splits, unlabelled, {
                    "semi": dataclasses.asdict(semi), "counts": counts, "summary": summary}))
    if counts["unlabelled"]["read"] or semi.method != "none":
        print(f"Unlabelled text: {semi.method} ({semi.reason})")
    fingerprint = {**setup.fingerprint, TARGETS: semi.shaping(BaselineRecipe.of(config))}
    run = Run(config, setup, clock, data, splits, unlabelled, semi, counts, fingerprint,
              TrainingState.load(setup.state_dir, fingerprint), strategy)
    run.share = dataclasses.replace(share, file_starts=data.file_starts) if share.divided else share
    return run


def prepare_run_inputs(run: Run) -> None:
    """The token ids, the vocabulary and the starting embedding (from the cache, if the run resumes);
    unlabelled texts only when a stage learns from them."""
    config = run.config
    whole = run.splits.train.texts, run.unlabelled.texts if run.semi.learns_from_unlabelled else None
    run.splits, run.unlabelled = run.share.restrict(run.splits, run.unlabelled, run.data, run.counts["train"])
    unlabelled = run.unlabelled.texts if run.semi.learns_from_unlabelled else None
    run.cache = InputsCache.of(run.setup.state_dir / INPUTS_CACHE, run.setup.fingerprint,
                               0 if unlabelled is None else len(unlabelled))
    with run.clock.timed("preprocess_s"):
        run.inputs = prepare_inputs(run.splits, config, run.setup.architecture, run.setup.derived, run.replicas,
                                    len(run.class_names), unlabelled, run.cache, run.share, whole)
    run.standardize = text_standardizer(run.inputs.vectorizer)


def reserve_disk(run: Run, classifier, cleanup: contextlib.ExitStack) -> None:
    """Refuse before training if the outputs and the starting embedding would not fit (the token ids are on
    disk already); advise on a full disk from here on; write the embedding into the cache (unless read there)."""
    inputs, setup = run.inputs, run.setup
    needed = (_output_bytes_needed(classifier.count_params(), run.config.blend_weight is not None)
              + run.cache.embedding_bytes(inputs))
    try:
        _check_free_space(setup.output_dir, needed)
    except UserError:
        if not inputs.from_cache:  # a run refused here leaves nothing behind
            run.cache.remove()
        raise
    cleanup.enter_context(_disk_full_advice(setup.output_dir, setup.state_dir, needed))
    run.cache.save_embedding(inputs)


@dataclass
class Scored:
    """What the run found: the saved model, its test evaluation, the validation check, and metrics.json."""
    model: object
    evaluation: Evaluation
    check: ValidationCheck
    report: dict


def score_the_run(run: Run, stages: list[Stage], classifier, training: TrainingResult) -> Scored:
    """Validation (the blend's weight chosen there), then the test split scored once; the model to save, its
    notes and metrics.json's record."""
    config, setup, clock = run.config, run.setup, run.clock
    baseline, train_strings, rows = run.baseline()
    with clock.timed("validation_s"):
        check = compare_on_validation(classifier, baseline, run.inputs.validation_ids, run.splits, train_strings,
                                      rows, run.standardize, BaselineRecipe.of(config))
    blend = blend_if_asked(config.blend_weight, config.arch, baseline, check)
    probabilities = score_on_test(config.arch, classifier, baseline, blend, run.inputs.test_ids, run.splits.test,
                                  run.standardize, clock)
    started_from = {**setup.started_from, **{name: value for stage in stages
                                            for name, value in stage.started_from(run).items()}}
    settings = run_settings(config, setup.derived)
    model = model_to_save(settings, started_from, run.inputs.vectorizer, classifier, baseline, blend, run.class_names)
    with clock.timed("intervals_s"):
        evaluation = evaluate(run.splits.test, run.class_names, probabilities)
    notes = (run.inputs.notes + [note for stage in stages for note in stage.notes(run, check, training)]
             + advice(check, config.arch, blend))
    semi = {"method": run.semi.method, "chosen": run.semi.reason}
    for stage in stages:
        semi.update(stage.record() if stage.result is not None else {})
    report = build_metrics(settings, started_from, {**run.counts, **run.inputs.counts()}, training, evaluation,
                           blend, check, notes, run.strategy, setup.role, semi)
    return Scored(model, evaluation, check, report)


def write_the_run(run: Run, stages: list[Stage], scored: Scored, training: TrainingResult) -> None:
    """Print the test results and notes; write the model, the figures, report.html and metrics.json (last)."""
    setup, clock, evaluation, report = run.setup, run.clock, scored.evaluation, scored.report
    print(f"\nTest set results:\n{evaluation.table}\n\n{evaluation.classification_report}")
    for note in report["notes"]:
        print(f"Note: {note}")
    show = run.config.show and display_available()
    stage_figures = {name: draw for stage in stages if stage.result is not None
                     for name, draw in stage.figures().items()}
    with clock.timed("write_s"):
        errors, figures = write_outputs(setup.output_dir, scored.model, evaluation, training.history,
                                        run.splits.test, show, stage_figures, scored.check.baseline_curve)
    with clock.timed("report_s"):
        mistakes = report_mistakes(scored.model, errors, run.class_names)
        sections = [part for stage in stages for part in stage.report_section(report["semi_supervised"])]
        page = build_html_report(report, evaluation, training.history, figures, mistakes, clock.summary(), sections)
        _write_text(setup.output_dir / "report.html", page)
    timing = clock.summary()
    _write_text(setup.output_dir / "metrics.json", json.dumps({**report, "timing": timing}, indent=2) + "\n")
    print(f"Outputs written to {setup.output_dir}/ (the overview: report.html; serving: saved_model/; curves: "
          f"tensorboard --logdir {setup.output_dir / 'tensorboard'}); the whole run took {timing['total_s']:.0f} s")
    if show:
        open_report(setup.output_dir / "report.html")
    show_figures(show)


@contextlib.contextmanager
def another_worker_stopped(role: ClusterRole | None):
    """In a cluster, a collective operation that fails because another worker stopped (reading its data, say;
    its own output says why) ends this worker with a line, not a traceback. (In training, Checkpoints says so.)"""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError):
        if role is None:
            raise
        raise UserError("another worker of the cluster stopped (its output says why): start every worker again "
                        "with the same command") from None


def run_training(config: TrainConfig) -> TrainingResult:
    """The whole run: check, load, split, prepare, the stages, score, report, write."""
    clock = Stopwatch()
    with contextlib.ExitStack() as cleanup:  # The output directory's lock, held to the end.
        setup = set_up_run(config, cleanup)
        cleanup.enter_context(another_worker_stopped(setup.role))
        strategy = set_up_tensorflow(config.cpu_replicas, config.seed, config.mixed_precision, setup.role,
                                     ARCHITECTURES[config.arch].op_threads)
        run = read_the_data(config, setup, clock, cleanup, strategy)
        stages = choose_stages(run.semi)
        prepare_run_inputs(run)
        for stage in stages:
            stage.prepare(run)
        with clock.timed("preprocess_s"):  # what is left of Word2Vec, trained beside the stages' preparing
            run.inputs.embedding_start.result()
        classifier, optimizer = build_model_and_optimizer(config, stages[-1].inputs, len(run.class_names),
                                                          run.strategy, setup.derived.embedding_dim)
        reserve_disk(run, classifier, cleanup)
        training = train_stages(run, stages, classifier, optimizer)
        if not setup.writes_outputs:
            print("Training done; the chief writes the model and the reports.")
            return training
        classifier = local_copy(classifier)
        write_the_run(run, stages, score_the_run(run, stages, classifier, training), training)
        return training


# ----------------------------------------------------------------------------------------------------------
# Prediction with a saved model
# ----------------------------------------------------------------------------------------------------------


def check_model_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"model file not found: {path} (train one first: python sentiment_analysis.py)")


def load_model(path: Path):
    check_model_file(path)

    try:
        # The layers are registered with Keras (see TfidfLogistic and the others); files saved before the
        # standardizer was registered name it plainly.
        return keras.models.load_model(path, custom_objects={"standardize_text": standardize_text}, compile=False)
    except Exception as error:  # Keras raises many types for a corrupt or foreign file.
        raise UserError(f"could not load the model {path}: {str(error).splitlines()[0][:200]}") from None


def model_class_names(model) -> tuple[str, ...]:
    """The class names saved in the model file (files written before they were saved: negative, positive)."""
    try:
        return tuple(model.get_layer("class_names").names)
    except ValueError:
        return CLASS_NAMES


def predict_strings(model, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Class probabilities (texts, classes) for raw strings, using the model's own vectorizer."""
    if not texts:
        return np.empty((0, len(model_class_names(model))))
    inputs = tf.reshape(tf.constant([str(text) for text in texts]), (-1, 1))
    return class_probabilities(model.predict(inputs, batch_size=batch_size, verbose=0))


def predicted_names(probabilities: np.ndarray, class_names, threshold: float) -> list[str]:
    return [class_names[index] for index in predicted_labels(probabilities, threshold)]


def predict_texts_command(model, texts: list[str], threshold: float, explain: bool = False) -> None:
    """One line per text: the predicted class, the shown probability and the text. With `explain`, each word's
    push after each line: coloured words in a terminal, else word<TAB>score lines and an empty line."""
    class_names = model_class_names(model)
    probabilities = predict_strings(model, texts)
    names = predicted_names(probabilities, class_names, threshold)
    explainer = build_explainer(model, class_names) if explain else None
    terminal = sys.stdout.isatty()
    shown, _ = shown_probability(probabilities)
    for index, (text, name, probability) in enumerate(zip(texts, names, shown)):
        print(f"{name}\t{probability:.4f}\t{one_line(text)}")
        if explainer is None:
            continue
        explanation = explain_text(explainer, text, explained_class(probabilities[index]))
        if terminal:
            print(f"    (green: towards {explanation.towards!r}, red: away from it)")
            print(coloured_text(explanation) + "\n")
        else:
            print("\n".join(explanation_lines(explanation)) + "\n")


def prediction_columns(probabilities: np.ndarray, present: np.ndarray, class_names, threshold: float) -> dict:
    """The columns predict adds to a CSV. Two classes: predicted_sentiment and probability_positive (the
    positive class's probability), as always. More: predicted_label and probability_NAME per class. Rows with
    no text stay empty."""
    rows = len(present)

    def spread(values, empty):
        column = np.full(rows, empty, dtype=object)
        column[present] = values
        return column

    label_column, probability_columns = label_set(class_names).prediction_columns(probabilities)
    return {label_column: spread(predicted_names(probabilities, class_names, threshold), ""),
            **{name: spread(values, np.nan).astype(float) for name, values in probability_columns.items()}}


def checked_threshold(threshold: float | None, class_names) -> float:
    """--threshold for a two-class model (default DECISION_THRESHOLD); a model of more classes takes none."""
    return label_set(class_names).threshold(threshold)


def predict_csv_command(model_path: Path, input_path: Path, output_path: Path, text_column: str | None,
                        threshold: float | None, sep: str | None, explain: bool = False,
                        chunk_rows: int = 5000) -> None:
    """Score a CSV in chunks (bounded memory); write every input column plus the prediction (with `explain`,
    also the strongest words each way), whole or not at all."""
    check_csv_file(input_path)
    _check_output_file(output_path)
    input_sep, output_sep = column_separator(input_path, sep), column_separator(output_path, sep)
    # Counting first gives the progress bar its total, and settles the encoding and finds a malformed row
    # before anything is written.
    encoding, total_rows = with_text_encoding(input_path, lambda encoding: (
        encoding, sum(len(chunk) for chunk in read_csv_chunks(input_path, encoding, 50000, sep=input_sep))))
    header = read_csv(input_path, encoding, nrows=0, sep=input_sep)
    column = find_column(header.columns, TEXT_COLUMN_NAMES, text_column, "text", "--text-column")
    model = load_model(model_path)
    class_names = model_class_names(model)
    threshold = checked_threshold(threshold, class_names)
    explainer = build_explainer(model, class_names) if explain else None

    progress = keras.utils.Progbar(total_rows, unit_name="review") if total_rows else None
    done = 0
    with _atomic_path(output_path) as temporary:
        for index, chunk in enumerate(read_csv_chunks(input_path, encoding, chunk_rows, sep=input_sep)):
            texts = chunk[column].fillna("").astype(str)
            present = (texts.str.strip() != "").to_numpy()
            probabilities = predict_strings(model, texts[present].tolist())
            for name, values in prediction_columns(probabilities, present, class_names, threshold).items():
                chunk[name] = values
            if explainer is not None:
                explanations = [explain_text(explainer, text, explained_class(row))
                                for text, row in zip(texts[present], probabilities)]
                for name, sign in (("top_words_for", 1), ("top_words_against", -1)):
                    words = np.full(len(chunk), "", dtype=object)
                    words[present] = [strongest_words(explanation, sign) for explanation in explanations]
                    chunk[name] = words
            chunk.to_csv(temporary, mode="w" if index == 0 else "a", header=index == 0, index=False, sep=output_sep)
            done += len(chunk)
            if progress is not None:
                progress.update(done)
    print(f"Wrote {done} predictions to {output_path}", file=sys.stderr)


def run_predict(args: argparse.Namespace) -> None:
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1 (got {args.threshold})")
    model_path = Path(args.model)
    check_model_file(model_path)  # Before reading any input, which can be a large CSV.
    if args.input:
        if args.texts:
            raise UserError("give either texts or --input, not both")
        if not args.output:
            raise UserError("--input needs --output (the CSV to write)")
        predict_csv_command(model_path, Path(args.input), Path(args.output), args.text_column, args.threshold,
                            args.sep, args.explain)
        return
    if args.output:
        raise UserError("--output goes with --input")
    texts = args.texts
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin]  # Blank lines are skipped below, with the empty texts.
    if not texts:
        raise UserError("nothing to predict: give texts, '-' for standard input, or --input FILE --output FILE")
    # An empty text gets no prediction, as an empty row of a CSV does (a model would still give it a probability).
    empty = [number for number, text in enumerate(texts, 1) if not text.strip()]
    if len(empty) == len(texts):
        raise UserError("every text given is empty: nothing to predict")
    if empty and args.texts != ["-"]:
        print(f"note: no prediction for empty text{'s' if len(empty) > 1 else ''} "
              f"{', '.join(map(str, empty))}", file=sys.stderr)
    texts = [text for text in texts if text.strip()]
    model = load_model(model_path)
    predict_texts_command(model, texts, checked_threshold(args.threshold, model_class_names(model)), args.explain)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def number_or_auto(text: str):
    return "auto" if text == "auto" else float(text)


# How the text of a flag becomes a config field's value, by the field's declared type. A field of any other
# type stops the script at start-up: it would otherwise be read as text without anyone noticing.
FLAG_PARSERS = {"str": str, "str | None": str, "int": int, "int | None": int, "float": float,
                "float | None": float, "float | str | None": number_or_auto}


def add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of the config dataclass: --no-NAME for a field that is true by default, --NAME for
    one that is false, --NAME VALUE otherwise."""
    for spec in dataclasses.fields(config_class):
        flag = flag_name(spec.name)
        help_text = argparse.SUPPRESS if spec.metadata["hidden"] else spec.metadata["help"]
        if spec.type == "bool":
            on_by_default = spec.default
            parser.add_argument(flag_name(f"no_{spec.name}") if on_by_default else flag, dest=spec.name,
                                action="store_false" if on_by_default else "store_true", help=help_text)
            continue
        if spec.type not in FLAG_PARSERS:
            raise TypeError(f"config field {spec.name!r} has type {spec.type!r}, which has no flag parser")
        extra = {"choices": spec.metadata["choices"]} if "choices" in spec.metadata else {}
        default = f" (default: {spec.default})" if spec.default is not None else ""
        parser.add_argument(flag, dest=spec.name, type=FLAG_PARSERS[spec.type], metavar=spec.name.upper(),
                            help=help_text if spec.metadata["hidden"] else help_text + default, **extra)


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment_analysis.py",
        description="Train an LSTM sentiment classifier on a CSV of reviews (default: imdb.csv). "
                    "Use 'sentiment_analysis.py predict --help' to apply a trained model.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named recipe (see README)")
    add_config_flags(parser, TrainConfig)
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment_analysis.py predict", allow_abbrev=False,
        description="Label new texts with a trained model. Prints the predicted class, its probability (for a "
                    "two-class model: the positive class's probability) and the text for each text given (or "
                    "each line of standard input with '-'), or scores a CSV.")
    parser.add_argument("texts", nargs="*", help="reviews to label; '-' reads one review per line from stdin")
    parser.add_argument("--model", default="outputs/model.keras", help="saved model (default: %(default)s)")
    parser.add_argument("--input", help="CSV file of reviews to score")
    parser.add_argument("--output", help="CSV file to write (with --input): input columns plus predictions")
    parser.add_argument("--text-column", help="text column of --input (default: reviews, review or text)")
    parser.add_argument("--threshold", type=float,
                        help="two-class models: probability at or above which a text gets the positive class "
                             f"(default: {DECISION_THRESHOLD})")
    parser.add_argument("--sep", help="column separator of --input and --output: a character, or tab "
                                      "(default: tab for .tsv files, else a comma)")
    parser.add_argument("--explain", action="store_true",
                        help="show how much each word pushed each prediction (towards the positive class of "
                             "two, else the predicted class); with --input, add the columns top_words_for and "
                             "top_words_against")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then those of the architecture (its record's), the preset's values, the flags the user gave."""
    given = vars(args)
    preset = PRESETS.get(given.pop("preset", None), {})
    arch = given.get("arch", preset.get("arch", "lstm"))
    return TrainConfig(**{**ARCHITECTURES[arch].defaults, **preset, **given})


def main(argv: list[str] | None = None) -> int:
    """Train (the default) or predict. Returns the exit status: 0, 2 for a user's mistake, 130 when training
    was interrupted (the reports are written, but training was cut short), 143 when SIGTERM stopped it (the
    training state is saved; nothing else is written)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # SENTIMENT_TRACEBACK=1 shows the full traceback of what is otherwise one line (to debug the script).
    show_traceback = os.environ.get("SENTIMENT_TRACEBACK", "") not in ("", "0")
    try:
        if argv[:1] == ["predict"]:
            run_predict(build_predict_parser().parse_args(argv[1:]))
        elif run_training(config_from_args(build_train_parser().parse_args(argv))).interrupted:
            return 130  # The shell's code for Ctrl-C.
    except UserError as error:
        if show_traceback:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Terminated as stop:
        print(stop, file=sys.stderr)
        # 128 + the signal's number, what a shell reports for a process the signal ended.
        return 130 if isinstance(stop, Interrupted) else 143
    except KeyboardInterrupt:  # Ctrl-C before training (in training, Checkpoints handles it and train reports)
        if show_traceback:
            raise
        print("Interrupted before training: no outputs written; the same command starts again (reusing the "
              "token ids if all were made)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
