"""Train an LSTM sentiment classifier on the IMDB reviews, report honest metrics, and use it on new text.

Run it:
    python sentiment_analysis.py                          # train the default model on imdb.csv
    python sentiment_analysis.py --epochs 1 --max-rows 5000 --no-show    # a quick look on a laptop
    python sentiment_analysis.py --preset best            # the strongest recipe measured (see README)
    python sentiment_analysis.py predict "A wonderful film." "Two hours I will never get back."
    python sentiment_analysis.py predict --input my_reviews.csv --output predictions.csv
    TF_CONFIG='{"cluster": ...}' python sentiment_analysis.py    # one worker of a cluster (see the README)

The default model is the design card's: Embedding(vocab, 128) -> SpatialDropout1D(0.2) -> LSTM(100) ->
Dense(1, sigmoid), its embedding started from Word2Vec vectors trained on the training split. Everything else
(other architectures, random embeddings, the blend with the TF-IDF baseline) is an option on top of it.
Outputs land in --output-dir (default outputs/): model.keras (takes raw strings),
metrics.json, classification_report.txt, history.csv, errors.csv and three figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# TensorFlow prints pages of C++ start-up logs; keep its errors only, unless the user asked otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCRIPT_DIR = Path(__file__).resolve().parent
TEXT_COLUMN_NAMES = ("reviews", "review", "text")
LABEL_COLUMN_NAMES = ("sentiment", "label")
POSITIVE_LABELS = {"positive", "pos", "1", "1.0", "true"}
NEGATIVE_LABELS = {"negative", "neg", "0", "0.0", "false"}
CLASS_NAMES = ("negative", "positive")
MIN_ROWS = 10


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


def option(default, help_text, **argparse_kwargs):
    """A config field whose help text becomes the flag's --help line."""
    return field(default=default, metadata={"help": help_text, **argparse_kwargs})


@dataclass
class TrainConfig:
    data: str = option(str(SCRIPT_DIR / "imdb.csv"), "CSV file with a review text column and a label column")
    text_column: str | None = option(None, "name of the text column (default: reviews, review or text)")
    label_column: str | None = option(None, "name of the label column (default: sentiment or label)")
    output_dir: str = option("outputs", "directory for the model, metrics, reports and figures")
    max_rows: int | None = option(None, "read only the first N rows of the CSV (quick runs)")
    seed: int = option(42, "seed for the split, the weights and the data order")
    test_fraction: float = option(0.2, "share of the rows held out for the final test")
    validation_fraction: float = option(0.1, "share of the training rows used for early stopping")
    vocab_size: int = option(30000, "number of distinct words kept, including padding and [UNK]")
    max_length: int = option(500, "tokens kept from the start of each review")
    embedding_dim: int = option(128, "size of the word vectors")
    spatial_dropout: float = option(0.2, "SpatialDropout1D rate after the embedding")
    arch: str = option("lstm", "recurrent layer type", choices=("lstm", "bilstm", "gru"))
    units: int = option(100, "units in each recurrent layer")
    layers: int = option(1, "number of stacked recurrent layers")
    embeddings: str = option("word2vec", "embedding initialisation: word2vec trains gensim Word2Vec on the "
                             "training split; random starts from random vectors", choices=("word2vec", "random"))
    epochs: int = option(4, "maximum number of training epochs")
    batch_size: int = option(128, "examples per batch (per device when several are used)")
    learning_rate: float = option(2e-3, "initial Adam learning rate")
    lr_schedule: str = option("cosine", "learning-rate schedule: constant, or cosine decay to zero over "
                              "--epochs", choices=("constant", "cosine"))
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW) when above zero")
    patience: int = option(1, "epochs without validation-loss improvement before stopping")
    baseline: bool = option(True, "also fit the TF-IDF + logistic-regression baseline on the same split")
    baseline_ngrams: int = option(2, "longest word n-gram in the baseline's TF-IDF features")
    blend_weight: float | str | None = option(None, "W in [0, 1] or auto (chosen on the validation split): also "
                                              "report W * neural + (1 - W) * baseline and save that blend as "
                                              "the model")
    show: bool = option(True, "show the figures in windows when a display is available")
    fresh: bool = option(False, "ignore a saved training state in the output directory and start over")
    mixed_precision: bool = option(False, "use mixed float16 precision on GPUs (ignored on CPUs)")
    cpu_replicas: int = option(1, "split the CPU into N logical devices and mirror the model across them "
                               "(tests the multi-device path without GPUs)")


# The strongest recipe measured on the shipped data, chosen by validation accuracy (figures in the README):
# the default LSTM trained for 6 epochs, blended with the TF-IDF baseline at a weight chosen on validation
# data. Flags given on the command line still override these values.
PRESETS = {
    "best": dict(epochs=6, blend_weight="auto"),
}


class UserError(Exception):
    """A mistake in the user's input or flags: reported as one line on stderr, never as a traceback."""


def validate_config(config: TrainConfig) -> None:
    checks = [
        (config.epochs >= 1, "--epochs must be at least 1"),
        (config.batch_size >= 1, "--batch-size must be at least 1"),
        (config.vocab_size >= 3, "--vocab-size must be at least 3 (padding, [UNK] and one word)"),
        (config.max_length >= 1, "--max-length must be at least 1"),
        (config.embedding_dim >= 1, "--embedding-dim must be at least 1"),
        (config.units >= 1, "--units must be at least 1"),
        (config.layers >= 1, "--layers must be at least 1"),
        (config.patience >= 1, "--patience must be at least 1"),
        (config.learning_rate > 0, "--learning-rate must be positive"),
        (config.weight_decay >= 0, "--weight-decay must be 0 or more"),
        (0 <= config.spatial_dropout < 1, "--spatial-dropout must be in [0, 1)"),
        (0 < config.test_fraction < 1, "--test-fraction must be between 0 and 1"),
        (0 < config.validation_fraction < 1, "--validation-fraction must be between 0 and 1"),
        (config.max_rows is None or config.max_rows >= 1, "--max-rows must be at least 1"),
        (config.blend_weight in (None, "auto") or 0 <= config.blend_weight <= 1,
         "--blend-weight must be in [0, 1] or auto"),
        (config.baseline_ngrams >= 1, "--baseline-ngrams must be at least 1"),
        (config.blend_weight is None or config.baseline, "--blend-weight needs the baseline (drop --no-baseline)"),
        (config.cpu_replicas >= 1, "--cpu-replicas must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"{message} (got {current_value(config, message)})")


def current_value(config: TrainConfig, message: str) -> str:
    flag = message.split()[0].lstrip("-").replace("-", "_")
    return repr(getattr(config, flag, "?"))


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


def read_csv(path: Path, encoding: str, **options):
    """pandas.read_csv with every cell as text; a malformed file becomes a UserError."""
    try:
        return pd.read_csv(path, encoding=encoding, dtype=str, keep_default_na=False, na_values=[""], **options)
    except UnicodeDecodeError:
        raise  # For with_text_encoding, which reads the file again as Latin-1.
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        raise UserError(f"could not parse {path} as CSV: {str(error).splitlines()[0]}") from None


def read_csv_chunks(path: Path, encoding: str, chunk_rows: int):
    """The CSV in DataFrames of chunk_rows rows, so memory stays bounded whatever the file's size."""
    try:
        yield from read_csv(path, encoding, chunksize=chunk_rows)
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


def encode_labels(labels: pd.Series) -> np.ndarray:
    """Map label strings (positive/negative, pos/neg, 1/0, true/false, any case) to 1/0."""
    normalized = labels.astype(str).str.strip().str.lower()
    values = sorted(normalized.unique())
    unknown = [value for value in values if value not in POSITIVE_LABELS | NEGATIVE_LABELS]
    if len(values) > 2:
        raise UserError(f"expected two label values but found {len(values)}: {', '.join(map(repr, values[:10]))}")
    if unknown:
        raise UserError(f"label values not understood: {', '.join(map(repr, unknown))} "
                        "(use positive/negative, pos/neg, 1/0 or true/false)")
    if len(values) < 2:
        raise UserError(f"only one label value in the data: {values[0]!r}; a classifier needs both classes")
    return normalized.isin(POSITIVE_LABELS).to_numpy(dtype=np.int32)


def load_dataset(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read the CSV and return (texts, labels, counts), with empty and duplicate reviews dropped and counted."""
    path = Path(config.data)
    check_csv_file(path)
    frame = with_text_encoding(path, lambda encoding: read_csv(path, encoding, nrows=config.max_rows))
    if frame.empty:
        raise UserError(f"the CSV has a header but no rows: {config.data}")
    text_column = find_column(frame.columns, TEXT_COLUMN_NAMES, config.text_column, "text", "--text-column")
    label_column = find_column(frame.columns, LABEL_COLUMN_NAMES, config.label_column, "label", "--label-column")
    texts, labels = frame[text_column], frame[label_column]
    missing_text = texts.isna() | (texts.fillna("").str.strip() == "")
    missing_label = ~missing_text & (labels.isna() | (labels.fillna("").str.strip() == ""))
    keep = ~(missing_text | missing_label)
    duplicate = keep & texts.duplicated(keep="first") & ~missing_text
    # A duplicate that lands on both sides of the split would inflate the test score, so drop it first.
    keep &= ~duplicate
    counts = {
        "rows_read": int(len(frame)),
        "dropped": {"missing_text": int(missing_text.sum()), "missing_label": int(missing_label.sum()),
                    "duplicate_text": int(duplicate.sum())},
        "rows_used": int(keep.sum()),
    }
    encoded = encode_labels(labels[keep])
    if counts["rows_used"] < MIN_ROWS:
        raise UserError(f"too few usable rows to split into train, validation and test: {counts['rows_used']} "
                        f"(need at least {MIN_ROWS})")
    return texts[keep].to_numpy(dtype=object), encoded, counts


def split_dataset(texts, labels, config: TrainConfig) -> dict:
    """Stratified train/validation/test split; the test part is never used to choose anything."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train_val, test = train_test_split(indices, test_size=config.test_fraction, stratify=labels,
                                           random_state=config.seed)
        train, val = train_test_split(train_val, test_size=config.validation_fraction,
                                      stratify=labels[train_val], random_state=config.seed)
    except ValueError as error:
        raise UserError(f"too few rows to split into train, validation and test ({len(labels)} rows, "
                        f"{int(labels.sum())} positive): {error}") from None
    return {name: (texts[part], labels[part]) for name, part in (("train", train), ("validation", val),
                                                                  ("test", test))}


# ----------------------------------------------------------------------------------------------------------
# Text to tokens. The standardizer lives inside the saved model, so training and prediction share it.
# ----------------------------------------------------------------------------------------------------------


def standardize_text(text):
    """Lowercase, remove HTML tags such as <br />, keep ! and ? as words, and drop other punctuation."""
    import tensorflow as tf

    text = tf.strings.lower(text, encoding="utf-8")
    text = tf.strings.regex_replace(text, r"<[^>]*>", " ")
    text = tf.strings.regex_replace(text, r"'", "")
    text = tf.strings.regex_replace(text, r"([!?])", r" \1 ")
    return tf.strings.regex_replace(text, r"[^\p{L}\p{N}!?]+", " ")


def text_dataset(texts, batch_size: int = 2048):
    """Batches of tf.string. (NumPy's astype(str) would make a fixed-width array as wide as the longest
    review: gigabytes for IMDB.)"""
    import tensorflow as tf

    def batches():
        for start in range(0, len(texts), batch_size):
            yield tf.constant([str(text) for text in texts[start:start + batch_size]])

    return tf.data.Dataset.from_generator(batches, output_signature=tf.TensorSpec((None,), tf.string))


def make_vectorizer(texts, config: TrainConfig):
    """A TextVectorization layer adapted on the training texts; pads or cuts every review to max_length."""
    from keras import layers

    vectorizer = layers.TextVectorization(max_tokens=config.vocab_size, standardize=standardize_text,
                                          output_sequence_length=config.max_length, name="vectorizer")
    vectorizer.adapt(text_dataset(texts))
    return vectorizer


def vectorize(vectorizer, texts) -> np.ndarray:
    """Token ids, right-padded with zeros to max_length, as int32 to halve the memory of int64."""
    return np.concatenate([vectorizer(batch).numpy().astype(np.int32) for batch in text_dataset(texts)])


def bucket_boundaries(max_length: int) -> list[int]:
    """Length limits for batching reviews of similar length, so little time goes into padding."""
    step = max(1, max_length // 20)
    return list(range(step, max_length, step)) or [max_length]


def count_batches(lengths: np.ndarray, batch_size: int, boundaries: list[int], drop_remainder: bool) -> int:
    """How many batches bucket_by_sequence_length makes from these lengths (for the learning-rate schedule)."""
    buckets = np.bincount(np.searchsorted(boundaries, lengths, side="right"))
    return int(sum(count // batch_size if drop_remainder else math.ceil(count / batch_size) for count in buckets))


def make_training_dataset(token_ids, labels, batch_size: int, max_length: int, shuffle_seed: int | None,
                          drop_remainder: bool = False):
    """Batches of similar-length reviews, padded on the right only as far as the longest in the batch.

    On several replicas each bucket's last partial batch is dropped, so every batch splits evenly across them.
    In a cluster every worker builds the same batches in the same order (same data, same seed) and keeps its
    replicas' share of each one (tf.data's DATA auto-sharding): every worker then runs the same number of steps,
    which the collective gradient sums need.

    Training builds one such dataset per epoch, shuffled with a seed of that epoch's own, so that a resumed
    run sees the same batches as one that was never interrupted."""
    import tensorflow as tf

    boundaries = bucket_boundaries(max_length)
    lengths = np.maximum(np.count_nonzero(token_ids, axis=1), 1)
    batches = count_batches(lengths, batch_size, boundaries, drop_remainder)

    dataset = tf.data.Dataset.from_tensor_slices((token_ids, labels.astype(np.float32)))
    dataset = dataset.map(lambda ids, label: (ids[: tf.math.count_nonzero(ids, dtype=tf.int32)], label),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=False)
    dataset = dataset.bucket_by_sequence_length(
        lambda ids, label: tf.maximum(tf.shape(ids)[0], 1), boundaries, [batch_size] * (len(boundaries) + 1),
        drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # The number of batches is known up front: the loop runs exactly that many steps on every worker.
    return dataset.apply(tf.data.experimental.assert_cardinality(batches)).with_options(options).prefetch(
        tf.data.AUTOTUNE)


def make_inference_dataset(token_ids, batch_size: int):
    """Batches in the order given (callers sort by length first), each padded to its longest review."""
    import tensorflow as tf

    lengths = np.maximum(np.count_nonzero(token_ids, axis=1), 1)

    def batches():
        for start in range(0, len(token_ids), batch_size):
            yield token_ids[start:start + batch_size, : lengths[start:start + batch_size].max()]

    signature = tf.TensorSpec(shape=(None, None), dtype=tf.int32)
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(len(token_ids) / batch_size)))


def predict_token_ids(model, token_ids, batch_size: int = 512) -> np.ndarray:
    """Positive-class probabilities in input order; sorting by length first keeps padding small."""
    lengths = np.count_nonzero(token_ids, axis=1)
    order = np.argsort(lengths, kind="stable")
    probabilities = np.empty(len(token_ids), dtype=np.float64)
    sorted_probabilities = model.predict(make_inference_dataset(token_ids[order], batch_size), verbose=0)
    probabilities[order] = np.asarray(sorted_probabilities, dtype=np.float64).reshape(-1)
    return probabilities


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def build_classifier(config: TrainConfig, vocab_size: int):
    """Embedding -> SpatialDropout1D -> recurrent layer(s) -> Dense(1, sigmoid), on token ids."""
    import keras
    from keras import layers

    recurrent = {"lstm": layers.LSTM, "bilstm": layers.LSTM, "gru": layers.GRU}[config.arch]
    inputs = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    # mask_zero lets the recurrent layer skip the right padding (and keeps cuDNN usable on a GPU).
    x = layers.Embedding(vocab_size, config.embedding_dim, mask_zero=True, name="embedding")(inputs)
    x = layers.SpatialDropout1D(config.spatial_dropout)(x)
    for index in range(config.layers):
        layer = recurrent(config.units, return_sequences=index < config.layers - 1)
        x = layers.Bidirectional(layer)(x) if config.arch == "bilstm" else layer(x)
    # The output stays float32 even under mixed precision, for a numerically sound sigmoid and loss.
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name=f"{config.arch}_classifier")


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def word2vec_matrix(token_ids, vocabulary: list[str], config: TrainConfig) -> np.ndarray:
    """Train gensim Word2Vec on the training reviews and return it as an embedding matrix for `vocabulary`."""
    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise UserError("--embeddings word2vec needs gensim: pip install gensim") from None

    words = np.array(vocabulary, dtype=object)
    sentences = [list(words[row[row > 1]]) for row in token_ids]
    # One worker thread and a hash that does not change between Python processes make it repeatable.
    model = Word2Vec(sentences, vector_size=config.embedding_dim, window=5, min_count=1, sg=0, epochs=5,
                     seed=config.seed, workers=1, hashfxn=stable_hash)
    rng = np.random.default_rng(config.seed)
    matrix = rng.normal(0, 0.05, size=(len(vocabulary), config.embedding_dim)).astype(np.float32)
    matrix[0] = 0.0
    for index, word in enumerate(vocabulary):
        if index > 1 and word in model.wv:
            matrix[index] = model.wv[word]
    return matrix


def make_optimizer(config: TrainConfig, steps_per_epoch: int):
    import keras

    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(1, steps_per_epoch * config.epochs), alpha=0.0)
    if config.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=config.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        # Scales the loss up so float16 gradients do not underflow (what Keras' compile() does by itself).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def export_model(vectorizer, classifier):
    """One model from raw strings to probabilities: the file is the whole predictor."""
    import keras

    text = keras.Input(shape=(1,), dtype="string", name="text")
    return keras.Model(text, classifier(vectorizer(text)), name="sentiment_model")


def local_copy(classifier, config: TrainConfig):
    """The trained classifier with plain variables on this machine, outside any distribution strategy: for
    scoring and saving, on the chief alone."""
    copy = build_classifier(config, classifier.get_layer("embedding").input_dim)
    copy.set_weights(classifier.get_weights())
    return copy


def check_model_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"model file not found: {path} (train one first: python sentiment_analysis.py)")


def load_model(path: Path):
    check_model_file(path)
    import keras

    try:
        custom_objects = {"standardize_text": standardize_text, "TfidfLogistic": tfidf_logistic_layer()}
        return keras.models.load_model(path, custom_objects=custom_objects, compile=False)
    except Exception as error:  # Keras raises many types for a corrupt or foreign file.
        raise UserError(f"could not load the model {path}: {str(error).splitlines()[0][:200]}") from None


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def cluster_role() -> dict | None:
    """This process's place in a cluster described by TF_CONFIG, or None when TF_CONFIG is not set.

    The chief (the task of type chief, or worker 0 when the cluster has no chief) writes the model, figures and
    reports; the other workers only train. Checked before any expensive work."""
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
    return {"chief": chief, "name": f"{task_type}-{index}", "workers": sum(map(len, cluster.values()))}


def choose_strategy(config: TrainConfig, role: dict | None):
    """TF_CONFIG set: MultiWorkerMirroredStrategy across the cluster's workers. Otherwise, with several GPUs
    (or --cpu-replicas N): MirroredStrategy on this machine. Otherwise TensorFlow's default strategy."""
    import tensorflow as tf

    if role:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if config.cpu_replicas > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] *
                                                   config.cpu_replicas)
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(config.cpu_replicas)])
    return tf.distribute.get_strategy()


def make_step_functions(classifier, optimizer, strategy):
    """One training step and one validation step over a batch split across the strategy's replicas.

    Each returns the batch's summed loss, number of correct predictions and number of reviews, added up over
    all replicas (and workers), from which the epoch's mean loss and accuracy follow."""
    import keras
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync

    def sums(labels, outputs):
        # The model's own (batch, 1) output: Keras then computes the loss from the sigmoid's input, which is
        # exact for confident predictions, where clipped probabilities would cap the loss.
        losses = keras.losses.binary_crossentropy(labels[:, None], outputs)
        correct = tf.cast((outputs[:, 0] >= 0.5) == (labels >= 0.5), tf.float32)
        return losses, [tf.reduce_sum(losses), tf.reduce_sum(correct), tf.cast(tf.size(labels), tf.float32)]

    def train_batch(token_ids, labels):
        with tf.GradientTape() as tape:
            losses, batch_sums = sums(labels, classifier(token_ids, training=True))
            # Keras' own rule: the mean over this replica's batch divided by the number of replicas, because
            # the optimizer sums the replicas' gradients.
            loss = optimizer.scale_loss(tf.reduce_mean(losses) / replicas)
        gradients = tape.gradient(loss, classifier.trainable_variables)
        optimizer.apply(gradients, classifier.trainable_variables)
        return batch_sums

    def validation_batch(token_ids, labels):
        return sums(labels, classifier(token_ids, training=False))[1]

    def on_all_replicas(batch_function):
        @tf.function
        def step(iterator):
            per_replica = strategy.run(batch_function, args=next(iterator))
            return [strategy.reduce("SUM", value, axis=None) for value in per_replica]
        return step

    return on_all_replicas(train_batch), on_all_replicas(validation_batch)


def run_epoch(step, dataset, steps: int, progress=None) -> dict:
    """Run `step` over one pass of the distributed dataset; the mean loss and accuracy per review."""
    loss, correct, count = 0.0, 0.0, 0.0
    iterator = iter(dataset)
    for index in range(steps):
        batch_loss, batch_correct, batch_count = (float(value) for value in step(iterator))
        loss, correct, count = loss + batch_loss, correct + batch_correct, count + batch_count
        if progress:
            progress.update(index + 1, [("loss", loss / count), ("accuracy", correct / count)], finalize=False)
    return {"loss": loss / count, "accuracy": correct / count}


def read_training_state(state_dir: Path, fingerprint: dict) -> dict | None:
    """The state a crashed run left in state_dir, if any; refused if it was saved with other settings."""
    state_file = state_dir / "state.json"
    if not state_file.is_file():
        return None
    saved = json.loads(state_file.read_text())
    if saved["fingerprint"] != fingerprint:
        raise UserError(f"the training state in {state_dir} was saved with other settings; "
                        "run with the same flags to resume, or add --fresh to start over")
    return saved


def training_fingerprint(config: TrainConfig) -> dict:
    """The settings a resumed run must share with the run that saved the state."""
    return {key: value for key, value in dataclasses.asdict(config).items()
            if key not in ("show", "fresh", "output_dir")}


def save_training_state(state_dir: Path, progress: dict, variables, best_weights) -> None:
    """Everything a crashed run needs to go on after this epoch: all model and optimizer variables (weights,
    Adam moments, step count, dropout seed state), the best weights so far, and the epoch's records.

    The arrays go first and state.json, naming them, last (each written whole): a crash at any moment leaves
    the previous complete state."""
    state_dir.mkdir(exist_ok=True)
    arrays_name = f"epoch-{progress['epoch']}.npz"
    arrays = {f"variable_{i}": variable.numpy() for i, variable in enumerate(variables)}
    arrays.update({f"best_{i}": weight for i, weight in enumerate(best_weights or [])})
    with atomic_path(state_dir / arrays_name) as temporary:
        np.savez(temporary, **arrays)
    write_text(state_dir / "state.json", json.dumps({**progress, "arrays": arrays_name}))
    for path in state_dir.iterdir():
        if path.name not in {"state.json", arrays_name}:
            path.unlink()


def restore_training_state(state_dir: Path, saved: dict, variables) -> list | None:
    """Put the saved variables back; return the best weights saved with them."""
    with np.load(state_dir / saved["arrays"]) as arrays:
        for i, variable in enumerate(variables):
            variable.assign(arrays[f"variable_{i}"])
        best = sorted((name for name in arrays.files if name.startswith("best_")), key=lambda n: int(n[5:]))
        return [arrays[name] for name in best] or None


def check_workers_agree(strategy, epoch: int) -> None:
    """In a cluster every worker must resume from the same epoch, or their steps would not line up."""
    import tensorflow as tf

    def this_worker():
        return tf.constant([epoch])

    @tf.function
    def every_worker():
        return strategy.gather(strategy.run(this_worker), axis=0)

    epochs = sorted(set(every_worker().numpy().tolist()))
    if len(epochs) > 1:
        raise UserError(f"the workers saved training states of different epochs ({epochs}); "
                        "run every worker with --fresh")


def train(classifier, optimizer, strategy, inputs: dict, config: TrainConfig, state_dir: Path,
          saved_state: dict | None, multi_worker: bool) -> dict:
    """Train with early stopping on validation loss and keep the best weights; save the training state after
    every epoch so that a crashed run continues; on Ctrl-C stop and keep the best weights so far.

    One loop for every setup: the strategy runs each step on its replicas, whether that is this CPU, several
    GPUs or the workers of a cluster. Not Keras' fit(): in Keras 3.15 it fails under
    MultiWorkerMirroredStrategy (keras-team/keras#20585)."""
    import keras
    import tensorflow as tf

    train_step, validation_step = make_step_functions(classifier, optimizer, strategy)
    val_data = strategy.experimental_distribute_dataset(inputs["val_data"])
    variables = classifier.variables + optimizer.variables
    progress = {"epoch": 0, "history": {}, "epoch_seconds": [], "best_loss": math.inf, "best_epoch": None,
                "wait": 0, "fingerprint": training_fingerprint(config)}
    best_weights = None
    if saved_state:
        best_weights = restore_training_state(state_dir, saved_state, variables)
        progress.update({key: saved_state[key] for key in progress})
        print(f"Resuming after epoch {progress['epoch']} from the state saved in {state_dir} "
              "(add --fresh to start over)")
    if multi_worker:
        check_workers_agree(strategy, progress["epoch"])
    resumed_after_epoch, interrupted = progress["epoch"], False
    names = ["loss", "accuracy", "val_loss", "val_accuracy"]
    try:
        while progress["epoch"] < config.epochs and progress["wait"] < config.patience:
            print(f"Epoch {progress['epoch'] + 1}/{config.epochs}")
            started = time.perf_counter()
            bar = keras.utils.Progbar(inputs["steps_per_epoch"], verbose=1 if sys.stdout.isatty() else 2,
                                      stateful_metrics=names)
            train_data = strategy.experimental_distribute_dataset(inputs["train_data"](progress["epoch"]))
            scores = run_epoch(train_step, train_data, inputs["steps_per_epoch"], bar)
            validation = run_epoch(validation_step, val_data, inputs["validation_steps"])
            scores.update({f"val_{name}": value for name, value in validation.items()})
            bar.update(inputs["steps_per_epoch"], list(scores.items()), finalize=True)
            progress["epoch"] += 1
            progress["epoch_seconds"].append(time.perf_counter() - started)
            for name in names:
                progress["history"].setdefault(name, []).append(scores[name])
            if scores["val_loss"] < progress["best_loss"]:
                progress.update(best_loss=scores["val_loss"], best_epoch=progress["epoch"], wait=0)
                best_weights = classifier.get_weights()
            else:
                progress["wait"] += 1
            save_training_state(state_dir, progress, variables, best_weights)
        if progress["wait"] >= config.patience:
            print(f"Early stopping: no lower validation loss in the last {progress['wait']} epoch(s)")
    except KeyboardInterrupt:
        interrupted = True
        print(f"\nInterrupted: evaluating the best weights so far. The training state stays in {state_dir}: "
              "run the same command to continue.", file=sys.stderr)
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError):
        if not multi_worker:
            raise
        # TensorFlow notices a crashed worker by its missing heartbeats and aborts the collective operations.
        raise UserError(f"another worker of the cluster stopped during epoch {progress['epoch'] + 1}; every "
                        "worker's state after the last whole epoch is saved: start all workers again with the "
                        "same command to resume") from None
    if best_weights is not None:
        print(f"Keeping the weights of epoch {progress['best_epoch']}, the lowest validation loss")
        classifier.set_weights(best_weights)
    if not interrupted:
        shutil.rmtree(state_dir, ignore_errors=True)
    return {
        "history": progress["history"],
        "epoch_seconds": progress["epoch_seconds"],
        "epochs_run": progress["epoch"],
        "best_epoch": progress["best_epoch"],
        "interrupted": interrupted,
        "resumed_after_epoch": resumed_after_epoch,
    }


# ----------------------------------------------------------------------------------------------------------
# Baseline: TF-IDF of word unigrams and bigrams with logistic regression
# ----------------------------------------------------------------------------------------------------------


def standardized_strings(texts) -> list[str]:
    """The model's own standardization applied to Python strings, so the baseline sees the same words."""

    return [value.decode("utf-8") for batch in text_dataset(texts) for value in standardize_text(batch).numpy()]


def fit_baseline(train_texts, train_labels, config: TrainConfig):
    """TF-IDF of word unigrams and bigrams (sublinear term frequency) with logistic regression.

    Expects standardized text (see `standardized_strings`); words are split on white space exactly as the
    Keras TextVectorization layer splits them, so the fitted baseline can be exported into the model file."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    features = TfidfVectorizer(ngram_range=(1, config.baseline_ngrams), sublinear_tf=True, min_df=2, max_df=0.95,
                               lowercase=False, tokenizer=str.split, token_pattern=None, dtype=np.float32)
    classifier = LogisticRegression(C=8.0, max_iter=1000, random_state=config.seed)
    return make_pipeline(features, classifier).fit(train_texts, train_labels)


@functools.cache
def tfidf_logistic_layer():
    """The fitted baseline's scoring as a Keras layer (made on first use so importing this file stays light).

    Input: n-gram ids from a TextVectorization layer whose vocabulary is the baseline's (0 is padding, 1 is
    out of vocabulary). Output: the logistic regression's probability, computed as scikit-learn does:
    (1 + log count) * idf, L2-normalized per review, dot the coefficients, plus the intercept, sigmoid."""
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="sentiment_analysis")
    class TfidfLogistic(keras.layers.Layer):
        def __init__(self, num_ids, **kwargs):
            super().__init__(**kwargs)
            self.num_ids = num_ids
            self.idf = self.add_weight(shape=(num_ids,), initializer="zeros", trainable=False, name="idf")
            self.coef = self.add_weight(shape=(num_ids,), initializer="zeros", trainable=False, name="coef")
            self.intercept = self.add_weight(shape=(), initializer="zeros", trainable=False, name="intercept")

        def call(self, ids):
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
            norms = tf.sqrt(tf.math.unsorted_segment_sum(weights**2, review, batch))
            scores = tf.math.unsorted_segment_sum(weights * tf.gather(self.coef, ngram), review, batch)
            return tf.sigmoid(scores / tf.maximum(norms, 1e-12) + self.intercept)[:, None]

        def compute_output_shape(self, input_shape):
            return (input_shape[0], 1)

        def get_config(self):
            return {**super().get_config(), "num_ids": self.num_ids}

    return TfidfLogistic


def export_blend(neural_model, baseline, weight: float):
    """One model from raw strings to weight * neural + (1 - weight) * baseline probability."""
    import keras
    from keras import layers

    features, classifier = baseline.named_steps["tfidfvectorizer"], baseline.named_steps["logisticregression"]
    vocabulary = features.get_feature_names_out().tolist()
    ngram_ids = layers.TextVectorization(standardize=standardize_text,
                                         ngrams=tuple(range(1, features.ngram_range[1] + 1)),
                                         output_mode="int",
                                         vocabulary=vocabulary, name="ngram_ids")
    scorer = tfidf_logistic_layer()(len(vocabulary) + 2, name="tfidf_logistic")
    # Ids 0 (padding) and 1 (out of vocabulary) get zero weight, as unseen n-grams do in scikit-learn.
    scorer.build(None)
    scorer.set_weights([np.concatenate([[0.0, 0.0], features.idf_]).astype(np.float32),
                        np.concatenate([[0.0, 0.0], classifier.coef_[0]]).astype(np.float32),
                        np.float32(classifier.intercept_[0])])
    text = keras.Input(shape=(1,), dtype="string", name="text")
    neural, linear = neural_model(text), scorer(ngram_ids(text))
    blended = layers.Add(name="blend")([layers.Rescaling(weight)(neural), layers.Rescaling(1 - weight)(linear)])
    return keras.Model(text, blended, name="blended_sentiment_model")


# ----------------------------------------------------------------------------------------------------------
# Evaluation and reports
# ----------------------------------------------------------------------------------------------------------


def compute_metrics(labels, probabilities, threshold: float = 0.5) -> dict:
    from sklearn import metrics

    predicted = (probabilities >= threshold).astype(int)
    return {
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "precision": float(metrics.precision_score(labels, predicted, zero_division=0)),
        "recall": float(metrics.recall_score(labels, predicted, zero_division=0)),
        "f1": float(metrics.f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(metrics.roc_auc_score(labels, probabilities)),
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
        "threshold": threshold,
    }


def choose_blend_weight(labels, neural, linear) -> float:
    """The weight of the neural model (0 to 1 in steps of 0.05) with the lowest log loss on validation data.

    Log loss, a proper scoring rule, varies smoothly with the weight; validation accuracy moves in steps of
    single reviews and would make the choice noisy."""
    from sklearn.metrics import log_loss

    weights = np.round(np.arange(0, 1.0001, 0.05), 2)
    losses = [log_loss(labels, np.clip(w * neural + (1 - w) * linear, 1e-7, 1 - 1e-7), labels=[0, 1])
              for w in weights]
    return float(weights[int(np.argmin(losses))])


def classification_report(labels, probabilities, threshold: float = 0.5) -> str:
    from sklearn import metrics

    return metrics.classification_report(labels, (probabilities >= threshold).astype(int), labels=[0, 1],
                                         target_names=list(CLASS_NAMES), digits=4, zero_division=0)


def confident_errors(texts, labels, probabilities, limit: int = 100) -> pd.DataFrame:
    """The test reviews the model got wrong with the highest confidence."""
    predicted = (probabilities >= 0.5).astype(int)
    wrong = np.flatnonzero(predicted != labels)
    confidence = np.abs(probabilities[wrong] - 0.5)
    chosen = wrong[np.argsort(-confidence, kind="stable")[:limit]]
    return pd.DataFrame({
        "text": texts[chosen],
        "true_label": [CLASS_NAMES[label] for label in labels[chosen]],
        "predicted_label": [CLASS_NAMES[label] for label in predicted[chosen]],
        "probability_positive": np.round(probabilities[chosen], 4),
    })


def summary_table(results: dict) -> str:
    names = ["accuracy", "precision", "recall", "f1", "roc_auc"]
    lines = [f"{'model':<12}" + "".join(f"{name:>11}" for name in names)]
    for model_name, scores in results.items():
        lines.append(f"{model_name:<12}" + "".join(f"{scores[name]:>11.4f}" for name in names))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------


def display_available() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def plot_confusion_matrix(matrix, title: str):
    import matplotlib.pyplot as plt
    import seaborn as sns

    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    sns.heatmap(np.array(matrix), annot=True, fmt="d", cmap="Blues", xticklabels=CLASS_NAMES,
                yticklabels=CLASS_NAMES, cbar=False, ax=axes)
    axes.set(xlabel="Predicted", ylabel="True", title=title)
    figure.tight_layout()
    return figure


def plot_roc_curves(labels, curves: dict):
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    figure, axes = plt.subplots(figsize=(5.5, 5))
    for name, probabilities in curves.items():
        false_positive, true_positive, _ = roc_curve(labels, probabilities)
        auc = roc_auc_score(labels, probabilities)
        axes.plot(false_positive, true_positive, label=f"{name} (AUC = {auc:.4f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set(xlabel="False positive rate", ylabel="True positive rate", title="ROC curve (test set)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def plot_history(history: dict):
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(epochs, history.get(metric, []), marker="o", label="training")
        axes.plot(epochs, history.get(f"val_{metric}", []), marker="o", label="validation")
        axes.set(xlabel="epoch", ylabel=metric, title=f"{metric.capitalize()} per epoch")
        axes.set_xticks(epochs)
        axes.legend()
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------------------------------
# Writing outputs whole: write to a hidden temporary file in the same directory, then rename.
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to `path` (same extension); rename it over `path` only on success."""
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def save_figure(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")


def save_model(model, path: Path) -> None:
    with atomic_path(path) as temporary:
        model.save(temporary)


def prepare_output_dir(path: Path) -> Path:
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


# ----------------------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------------------


def setup_tensorflow(config: TrainConfig, role: dict | None):
    """Choose the distribution strategy (first: a cluster's must exist before any other TensorFlow work), then
    seed everything and make ops deterministic, so the same seed gives the same run on the same machine."""
    strategy = choose_strategy(config, role)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    if config.mixed_precision:
        if tf.config.list_physical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            print("warning: --mixed-precision needs a GPU; training in float32", file=sys.stderr)
    return tf, strategy


def run_training(config: TrainConfig) -> dict:
    """The whole run: check, load, split, prepare, train, score, write. Returns the metrics report."""
    started = time.perf_counter()
    timing = {}
    validate_config(config)
    role = cluster_role()
    if role and config.cpu_replicas > 1:
        raise UserError("--cpu-replicas cannot be combined with TF_CONFIG: each worker uses its own devices")
    output_dir = prepare_output_dir(Path(config.output_dir))
    # Every worker of a cluster keeps its own training state; only the chief writes the outputs.
    state_dir = output_dir / ("training_state" if not role or role["chief"] else f"training_state-{role['name']}")
    if config.fresh:
        shutil.rmtree(state_dir, ignore_errors=True)
    saved_state = read_training_state(state_dir, training_fingerprint(config))
    texts, labels, counts = load_dataset(config)
    splits = split_dataset(texts, labels, config)
    counts.update({name: int(len(part[1])) for name, part in splits.items()})
    counts["positive"], counts["negative"] = int(labels.sum()), int(len(labels) - labels.sum())
    timing["load_s"] = time.perf_counter() - started
    print(f"Read {counts['rows_read']} rows from {config.data}; dropped {counts['dropped']}; "
          f"train {counts['train']}, validation {counts['validation']}, test {counts['test']}")

    tf, strategy = setup_tensorflow(config, role)
    # TensorFlow's class for MultiWorkerMirroredStrategy is called CollectiveAllReduceStrategy.
    strategy_name = "MultiWorkerMirroredStrategy" if role else type(strategy).__name__
    cluster = f" on {role['workers']} worker(s); this is {role['name']}" if role else ""
    print(f"Strategy: {strategy_name} with {strategy.num_replicas_in_sync} replica(s){cluster}; "
          f"TensorFlow {tf.__version__}")
    step_started = time.perf_counter()
    inputs = prepare_inputs(splits, config, strategy.num_replicas_in_sync)
    timing["preprocess_s"] = time.perf_counter() - step_started

    with strategy.scope():
        classifier = build_classifier(config, len(inputs["vocabulary"]))
        if inputs["embedding_matrix"] is not None:
            classifier.get_layer("embedding").set_weights([inputs["embedding_matrix"]])
        optimizer = make_optimizer(config, inputs["steps_per_epoch"])
        optimizer.build(classifier.trainable_variables)
    classifier.summary(print_fn=print)
    step_started = time.perf_counter()
    training = train(classifier, optimizer, strategy, inputs, config, state_dir, saved_state, role is not None)
    timing["train_s"] = time.perf_counter() - step_started
    timing["epoch_s"] = training["epoch_seconds"]
    if role and not role["chief"]:
        print("Training done; the chief writes the model and the reports.")
        return {"training": training}
    classifier = local_copy(classifier, config)

    probabilities, model, blend_weight, validation_accuracy = score_models(classifier, splits, inputs, config,
                                                                           timing)
    test_labels = splits["test"][1]
    results = {name: compute_metrics(test_labels, values) for name, values in probabilities.items()}
    neural = config.arch  # The neural model's results are named after it: lstm, bilstm or gru.
    primary = "blend" if blend_weight is not None else neural
    report = {
        "model": primary,
        **({"blend_weight": blend_weight} if blend_weight is not None else {}),
        **({"validation_accuracy": validation_accuracy} if validation_accuracy else {}),
        "test": results[primary],
        **{name: scores for name, scores in results.items() if name not in (primary, neural)},
        **({neural: results[neural]} if primary != neural else {}),
        "data": counts,
        "config": dataclasses.asdict(config),
        "training": {key: training[key] for key in ("epochs_run", "best_epoch", "interrupted",
                                                     "resumed_after_epoch")},
        "timing": timing,
        "environment": {"python": platform.python_version(), "tensorflow": tf.__version__,
                        "machine": platform.platform(), "cpus": os.cpu_count(),
                        "strategy": strategy_name, "replicas": strategy.num_replicas_in_sync},
    }
    print("\nTest set results:\n" + summary_table(results))
    print(f"\n{classification_report(test_labels, probabilities[primary])}")
    write_outputs(output_dir, model, report, training["history"], splits["test"], probabilities, config,
                  started)
    print(f"Outputs written to {output_dir}/; the whole run took {report['timing']['total_s']:.0f} s")
    return report


def prepare_inputs(splits: dict, config: TrainConfig, replicas: int) -> dict:
    """Vocabulary, token ids, the training batches of each epoch, the validation batches and (with
    --embeddings word2vec) the starting embedding."""
    train_texts, train_labels = splits["train"]
    vectorizer = make_vectorizer(train_texts, config)
    vocabulary = vectorizer.get_vocabulary()
    ids = {name: vectorize(vectorizer, texts) for name, (texts, _) in splits.items()}
    global_batch, several = config.batch_size * replicas, replicas > 1

    def train_data(epoch: int):
        return make_training_dataset(ids["train"], train_labels, global_batch, config.max_length,
                                     config.seed + epoch, drop_remainder=several)

    val_data = make_training_dataset(ids["validation"], splits["validation"][1], global_batch, config.max_length,
                                     None, drop_remainder=several)
    steps_per_epoch = int(train_data(0).cardinality())
    if int(val_data.cardinality()) == 0 or steps_per_epoch == 0:
        raise UserError(f"too few rows for batches of {global_batch} on {replicas} replicas; lower --batch-size")
    embedding_matrix = None
    if config.embeddings == "word2vec":
        print("Training Word2Vec on the training split ...")
        embedding_matrix = word2vec_matrix(ids["train"], vocabulary, config)
    print(f"Vocabulary {len(vocabulary)} words; {steps_per_epoch} batches per epoch")
    return {"vectorizer": vectorizer, "vocabulary": vocabulary, "ids": ids, "train_data": train_data,
            "val_data": val_data, "steps_per_epoch": steps_per_epoch,
            "validation_steps": int(val_data.cardinality()), "embedding_matrix": embedding_matrix}


def score_models(classifier, splits: dict, inputs: dict, config: TrainConfig, timing: dict):
    """Test-set probabilities of the LSTM, the baseline and the blend; the model to save; the blend weight and,
    when it was chosen here, the validation accuracy of each part.

    Every choice (epochs, blend weight) is made on the validation split; the test split is only scored."""
    step_started = time.perf_counter()
    neural = config.arch
    probabilities = {neural: predict_token_ids(classifier, inputs["ids"]["test"])}
    timing["evaluate_s"] = time.perf_counter() - step_started
    model = export_model(inputs["vectorizer"], classifier)
    if not config.baseline:
        return probabilities, model, None, None
    step_started = time.perf_counter()
    print("Fitting the TF-IDF + logistic-regression baseline ...")
    (train_texts, train_labels), (val_texts, val_labels), (test_texts, _) = splits.values()
    baseline = fit_baseline(standardized_strings(train_texts), train_labels, config)
    probabilities["baseline"] = baseline.predict_proba(standardized_strings(test_texts))[:, 1]
    timing["baseline_s"] = time.perf_counter() - step_started
    if config.blend_weight is None:
        return probabilities, model, None, None
    weight, validation_accuracy = config.blend_weight, None
    if weight == "auto":
        validation = {neural: predict_token_ids(classifier, inputs["ids"]["validation"]),
                      "baseline": baseline.predict_proba(standardized_strings(val_texts))[:, 1]}
        weight = choose_blend_weight(val_labels, validation[neural], validation["baseline"])
        validation["blend"] = weight * validation[neural] + (1 - weight) * validation["baseline"]
        # Reported so that presets can be compared on validation data, never on the test set.
        validation_accuracy = {name: round(float(np.mean((values >= 0.5) == val_labels)), 4)
                               for name, values in validation.items()}
    print(f"Blend: {weight:.2f} * {neural} + {1 - weight:.2f} * baseline")
    probabilities["blend"] = weight * probabilities[neural] + (1 - weight) * probabilities["baseline"]
    return probabilities, export_blend(model, baseline, weight), weight, validation_accuracy


def write_outputs(output_dir, model, report, history, test_split, probabilities, config, started):
    """Save the model, reports and figures, each file whole, metrics.json last with the total time; then show
    the figures if asked and able."""
    import matplotlib

    show = config.show and display_available()
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test_texts, test_labels = test_split
    primary = report["model"]
    save_model(model, output_dir / "model.keras")
    report_text = classification_report(test_labels, probabilities[primary])
    write_text(output_dir / "classification_report.txt",
               f"Test set, model: {primary}\n\n{report_text}\n{summary_table_from_report(report)}\n")
    history_frame = pd.DataFrame(history)
    history_frame.insert(0, "epoch", np.arange(1, len(history_frame) + 1))
    write_csv(output_dir / "history.csv", history_frame)
    write_csv(output_dir / "errors.csv", confident_errors(test_texts, test_labels, probabilities[primary]))
    figures = {
        "confusion_matrix.png": plot_confusion_matrix(report["test"]["confusion_matrix"],
                                                      f"Confusion matrix ({primary}, test set)"),
        "roc_curve.png": plot_roc_curves(test_labels, probabilities),
        "training_history.png": plot_history(history),
    }
    for name, figure in figures.items():
        save_figure(figure, output_dir / name)
    report["timing"]["total_s"] = time.perf_counter() - started
    report["timing"] = {key: np.round(value, 2).tolist() for key, value in report["timing"].items()}
    write_text(output_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
    if show:
        try:
            plt.show()
        except Exception as error:  # A broken display must not lose a finished run.
            print(f"warning: could not show the figures: {error}", file=sys.stderr)
    plt.close("all")


def summary_table_from_report(report: dict) -> str:
    scores = {report["model"]: report["test"]}
    scores.update({name: report[name] for name in (report["config"]["arch"], "baseline") if name in report})
    return summary_table(scores)


# ----------------------------------------------------------------------------------------------------------
# Prediction with a saved model
# ----------------------------------------------------------------------------------------------------------


def one_line(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def predict_strings(model, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Probabilities of the positive class for raw strings, using the model's own vectorizer."""
    import tensorflow as tf

    if not texts:
        return np.empty(0)
    inputs = tf.reshape(tf.constant([str(text) for text in texts]), (-1, 1))
    return np.asarray(model.predict(inputs, batch_size=batch_size, verbose=0), dtype=np.float64).reshape(-1)


def label_for(probability: float, threshold: float) -> str:
    return CLASS_NAMES[int(probability >= threshold)]


def predict_texts_command(model_path: Path, texts: list[str], threshold: float) -> None:
    model = load_model(model_path)
    for text, probability in zip(texts, predict_strings(model, texts)):
        print(f"{label_for(probability, threshold)}\t{probability:.4f}\t{one_line(text)}")


def predict_csv_command(model_path: Path, input_path: Path, output_path: Path, text_column: str | None,
                        threshold: float, chunk_rows: int = 5000) -> None:
    """Score a CSV in chunks (bounded memory); write every input column plus the prediction, whole or not at
    all."""
    check_csv_file(input_path)
    check_output_file(output_path)
    # Counting first gives the progress bar its total, and settles the encoding and finds a malformed row
    # before anything is written.
    encoding, total_rows = with_text_encoding(input_path, lambda encoding: (
        encoding, sum(len(chunk) for chunk in read_csv_chunks(input_path, encoding, 50000))))
    header = read_csv(input_path, encoding, nrows=0)
    column = find_column(header.columns, TEXT_COLUMN_NAMES, text_column, "text", "--text-column")
    model = load_model(model_path)
    import keras

    progress = keras.utils.Progbar(total_rows, unit_name="review") if total_rows else None
    done = 0
    with atomic_path(output_path) as temporary:
        for index, chunk in enumerate(read_csv_chunks(input_path, encoding, chunk_rows)):
            texts = chunk[column].fillna("").astype(str)
            present = texts.str.strip() != ""
            probabilities = np.full(len(chunk), np.nan)
            probabilities[present.to_numpy()] = predict_strings(model, texts[present].tolist())
            chunk["predicted_sentiment"] = ["" if np.isnan(p) else label_for(p, threshold) for p in probabilities]
            chunk["probability_positive"] = np.round(probabilities, 4)
            chunk.to_csv(temporary, mode="w" if index == 0 else "a", header=index == 0, index=False)
            done += len(chunk)
            if progress is not None:
                progress.update(done)
    print(f"Wrote {done} predictions to {output_path}", file=sys.stderr)


def check_output_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"output path is a directory: {path}")
    if not path.parent.is_dir():
        raise UserError(f"output directory does not exist: {path.parent}")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment_analysis.py",
        description="Train an LSTM sentiment classifier on a CSV of reviews (default: imdb.csv). "
                    "Use 'sentiment_analysis.py predict --help' to apply a trained model.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named recipe (see README)")
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        help_text = spec.metadata["help"]
        if spec.type == "bool":
            negative = spec.default
            parser.add_argument(f"--no-{spec.name.replace('_', '-')}" if negative else flag, dest=spec.name,
                                action="store_false" if negative else "store_true", help=help_text)
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float,
                "float | str | None": number_or_auto}.get(spec.type, str)
        extra = {"choices": spec.metadata["choices"]} if "choices" in spec.metadata else {}
        default = f" (default: {spec.default})" if spec.default is not None else ""
        parser.add_argument(flag, dest=spec.name, type=kind, metavar=spec.name.upper(), help=help_text + default,
                            **extra)
    return parser


def number_or_auto(text: str):
    return "auto" if text == "auto" else float(text)


def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment_analysis.py predict", allow_abbrev=False,
        description="Label new reviews with a trained model. Prints label, probability of positive and the text "
                    "for each text given (or each line of standard input with '-'), or scores a CSV.")
    parser.add_argument("texts", nargs="*", help="reviews to label; '-' reads one review per line from stdin")
    parser.add_argument("--model", default="outputs/model.keras", help="saved model (default: %(default)s)")
    parser.add_argument("--input", help="CSV file of reviews to score")
    parser.add_argument("--output", help="CSV file to write (with --input): input columns plus predictions")
    parser.add_argument("--text-column", help="text column of --input (default: reviews, review or text)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability at or above which a review is positive (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the preset's values, then the flags the user gave."""
    given = vars(args)
    preset = PRESETS.get(given.pop("preset", None), {})
    return TrainConfig(**{**preset, **given})


def run_predict(argv: list[str]) -> None:
    args = build_predict_parser().parse_args(argv)
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1 (got {args.threshold})")
    model_path = Path(args.model)
    check_model_file(model_path)  # Before reading any input, which can be a large CSV.
    if args.input:
        if args.texts:
            raise UserError("give either texts or --input, not both")
        if not args.output:
            raise UserError("--input needs --output (the CSV to write)")
        predict_csv_command(model_path, Path(args.input), Path(args.output), args.text_column, args.threshold)
        return
    if args.output:
        raise UserError("--output goes with --input")
    texts = args.texts
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("nothing to predict: give texts, '-' for standard input, or --input FILE --output FILE")
    predict_texts_command(model_path, texts, args.threshold)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["predict"]:
            run_predict(argv[1:])
        else:
            report = run_training(config_from_args(build_train_parser().parse_args(argv)))
            if report["training"]["interrupted"]:
                return 130  # The shell's code for Ctrl-C: the reports are written, but training was cut short.
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
