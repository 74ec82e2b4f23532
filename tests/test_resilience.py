"""Crash and Ctrl-C during training, several devices (logical CPUs) and two workers on 127.0.0.1."""

import json
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import (SCRIPT, SMALL_BATCH_EPOCHS, SMALL_BATCH_FLAGS, SMALL_BATCH_TRAINING, TINY_CSV, TINY_FLAGS,
                      assert_user_error, build_once, read_scalars, run_main, split, train_tiny_in_process)

# Many epochs with patience to match, so the run is still training when the test stops it.
LONG_RUN = [*TINY_FLAGS, "--no-baseline", "--epochs", "8", "--patience", "8"]


# The script with auto's size rule for distillation lowered to one training row, so that a tiny run distils as
# a large one does by default.
DISTILLING_SCRIPT = ["-c", "import sys, sentiment_analysis as sa; sa.AUTO_DISTILLATION_ROWS = 1; "
                           "sys.exit(sa.main(sys.argv[1:]))"]


def start_training(output_dir, flags, env_extra=None, data=TINY_CSV, script=(str(SCRIPT),)):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "TF_CONFIG")}
    env.update({"PYTHONPATH": str(SCRIPT.parent), **(env_extra or {})})
    command = [sys.executable, *script, "--data", str(data), "--output-dir", str(output_dir), *flags]
    # A shell without job control starts background commands with SIGINT ignored, and the child would inherit
    # that (Python then never raises KeyboardInterrupt): give the run the default, as a terminal would.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_first_epoch(process, output_dir, timeout=240, stage=None):
    """Until the run has saved the state of a whole epoch (of a pretraining stage's, if named: its directory)."""
    state_file = output_dir / "training_state" / (stage or "") / "state.json"
    deadline = time.monotonic() + timeout
    while not state_file.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.02)


def crash(output_dir, flags):
    """Start a run of `flags`, let it finish its first epoch, then SIGKILL it: no clean-up code runs, as in a
    crash or a power cut."""
    process = start_training(output_dir, flags)
    wait_for_first_epoch(process, output_dir)
    process.kill()
    process.wait()
    return output_dir


@pytest.fixture
def crashed(tmp_path, tmp_path_factory):
    """A copy of one run of SMALL_BATCH_FLAGS killed after its first epoch (killed once per session)."""
    def build(output_dir):
        return crash(output_dir, [*TINY_FLAGS, *SMALL_BATCH_FLAGS])

    return Path(shutil.copytree(build_once(tmp_path_factory, "crashed", build), tmp_path / "crashed"))


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(crashed, tmp_path, small_batch_run):
    saved = json.loads((crashed / "training_state" / "state.json").read_text())
    completed, epochs = saved["epoch"], SMALL_BATCH_EPOCHS
    assert 1 <= completed < epochs
    assert (crashed / "training_state" / "inputs_cache" / "inputs.json").is_file()
    assert not (crashed / "metrics.json").exists()

    # Settings that do not shape training may change: another directory name, the baseline and a blend.
    resumed = tmp_path / "renamed"
    crashed.rename(resumed)
    result = train_tiny_in_process(resumed, *SMALL_BATCH_TRAINING, "--blend-weight", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming after epoch {completed}" in result.stdout
    assert "Reusing the token ids" in result.stdout and "Training Word2Vec" not in result.stdout  # its cache
    assert f"Epoch {completed + 1}/{epochs}" in result.stdout and f"Epoch 1/{epochs}" not in result.stdout
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["training"]["resumed_after_epoch"] == completed
    assert metrics["model"] == "blend" and metrics["blend_weight"] == 0.5
    history = pd.read_csv(resumed / "history.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))
    assert history["loss"].iloc[0] == saved["history"]["loss"][0]
    assert not (resumed / "training_state").exists()
    # TensorBoard: the resumed run added its own event file and its curve goes on from the crashed run's.
    assert len(list((resumed / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 2
    logged = read_scalars(resumed / "tensorboard" / "train")["epoch_loss"]
    assert sorted(logged) == list(range(1, epochs + 1))
    np.testing.assert_allclose([logged[epoch] for epoch in range(1, epochs + 1)], history["loss"], rtol=1e-6)

    # The resumed run is the run that was never interrupted: same batches, same weights, same results.
    whole, _ = small_batch_run
    pd.testing.assert_frame_equal(pd.read_csv(whole / "history.csv"), history)
    assert json.loads((whole / "metrics.json").read_text())["test"] == metrics["lstm"]


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_and_fresh_starts_over(crashed):
    for changed in (["--units", "8"], ["--seed", "7"], ["--vocab-size", "1000"]):
        result = train_tiny_in_process(crashed, *SMALL_BATCH_FLAGS, *changed)
        assert_user_error(result, "other settings", "--fresh")
    result = train_tiny_in_process(crashed, *SMALL_BATCH_FLAGS, "--epochs", "5")
    assert_user_error(result, "other settings", "--fresh")
    result = train_tiny_in_process(crashed, "--no-baseline", "--units", "8", "--fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" not in result.stdout
    assert json.loads((crashed / "metrics.json").read_text())["training"]["resumed_after_epoch"] == 0


def directory_listing(directory):
    """Every file and its modification time, but the output lock and pass one's text store (a killed run's
    stale ones are taken over and removed)."""
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*")
            if path.name != ".run.lock" and not path.name.endswith(".texts.utf8")}


@pytest.mark.slow
def test_a_run_that_learns_from_the_baseline_resumes_only_with_the_same_baseline(tmp_path, monkeypatch):
    """The baseline is a distilled run's teacher: resumed without it, or with other n-grams, the run would go on
    learning from other targets, so it is refused (one line, exit 2, nothing written); the same flags resume. A
    plain --semi-supervised none run does not learn from the baseline and still resumes with --no-baseline."""
    import sentiment_analysis as sa

    flags = [*TINY_FLAGS, "--epochs", "8", "--patience", "8"]
    distilled = tmp_path / "distilled"
    process = start_training(distilled, flags, script=DISTILLING_SCRIPT)
    wait_for_first_epoch(process, distilled)
    process.kill()
    process.wait()
    saved = json.loads((distilled / "training_state" / "state.json").read_text())
    assert saved["fingerprint"]["targets"]["distils"] and saved["epoch"] < 8

    monkeypatch.setattr(sa, "AUTO_DISTILLATION_ROWS", 1)
    before = directory_listing(distilled)
    for changed in (["--no-baseline"], ["--baseline-ngrams", "3"]):
        result = train_tiny_in_process(distilled, *flags[len(TINY_FLAGS):], *changed)
        assert result.returncode == 2
        assert_user_error(result, "other settings", "--fresh")
        assert "Training Word2Vec" not in result.stdout and "Epoch" not in result.stdout  # refused before the work
        assert directory_listing(distilled) == before
    result = train_tiny_in_process(distilled, *flags[len(TINY_FLAGS):])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming after epoch {saved['epoch']}" in result.stdout
    assert json.loads((distilled / "metrics.json").read_text())["semi_supervised"]["distillation"]

    plain = tmp_path / "plain"
    process = start_training(plain, [*flags, "--semi-supervised", "none"])
    wait_for_first_epoch(process, plain)
    process.kill()
    process.wait()
    completed = json.loads((plain / "training_state" / "state.json").read_text())["epoch"]
    result = train_tiny_in_process(plain, "--epochs", "8", "--patience", "8", "--semi-supervised", "none",
                                   "--no-baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming after epoch {completed}" in result.stdout


def config_for(*flags):
    import sentiment_analysis as sa

    return sa.config_from_args(sa.build_train_parser().parse_args(list(flags)))


def fingerprint_of(config):
    import sentiment_analysis as sa

    return sa.training_fingerprint(config, sa.Derived.of(config, sa.ARCHITECTURES[config.arch]))


def test_only_settings_that_shape_training_must_match_to_resume():
    base = fingerprint_of(config_for())
    for flags in (["--output-dir", "elsewhere"], ["--no-show"], ["--no-baseline"], ["--blend-weight", "0.3"],
                  ["--preset", "best", "--min-epochs", "4"], ["--baseline-ngrams", "3"], ["--fresh"]):
        assert fingerprint_of(config_for(*flags)) == base, flags
    for flags in (["--epochs", "5"], ["--min-epochs", "6"], ["--patience", "2"], ["--embeddings", "random"],
                  ["--vocab-size", "100"], ["--seed", "1"], ["--batch-size", "64"], ["--arch", "gru"],
                  ["--max-rows", "100"], ["--learning-rate", "0.01"], ["--cpu-replicas", "2"]):
        assert fingerprint_of(config_for(*flags)) != base, flags


def test_what_the_run_learns_from_is_part_of_the_resume_check():
    import sentiment_analysis as sa

    two, three = sa.BaselineRecipe(ngrams=2), sa.BaselineRecipe(ngrams=3)
    distilled = sa.SemiSupervised("teacher", "auto", distils=True)
    plain = sa.SemiSupervised("none", "auto: no unlabelled text")
    assert distilled.shaping(two) != distilled.shaping(three)  # other n-grams: other targets
    assert distilled.shaping(two) != plain.shaping(two)  # --no-baseline turns auto's distillation off
    assert distilled.shaping(two)["label_share"] == sa.DISTILLATION_LABEL_SHARE
    assert plain.shaping(two) == plain.shaping(three)  # the plain run does not learn from the baseline
    settings = fingerprint_of(config_for())
    with_targets = {**settings, sa.TARGETS: distilled.shaping(two)}
    assert sa.same_training(with_targets, settings)  # before the data is read: the flags alone
    assert sa.same_training(with_targets, with_targets)
    assert not sa.same_training(with_targets, {**settings, sa.TARGETS: distilled.shaping(three)})
    assert not sa.same_training(settings, with_targets)  # a state saved before targets were recorded


@pytest.mark.parametrize("damage", ["not json", '{"epoch": 1', '{"epoch": 1}', "missing arrays", "bad arrays"])
def test_a_damaged_training_state_is_one_line_suggesting_fresh(tmp_path, damage):
    import sentiment_analysis as sa

    state_dir = tmp_path / "training_state"
    config = sa.TrainConfig(data=str(TINY_CSV), output_dir=str(tmp_path))
    state = sa.TrainingState(fingerprint=fingerprint_of(config), epoch=1,
                             variable_values=[np.zeros(3)], best_weights=[np.ones(2)])
    state.save(state_dir)
    loaded = sa.TrainingState.load(state_dir, fingerprint_of(config))
    assert loaded.epoch == 1 and loaded.variable_values[0].tolist() == [0, 0, 0]
    assert loaded.best_weights[0].tolist() == [1, 1]
    if damage == "missing arrays":
        (state_dir / "epoch-1.npz").unlink()
    elif damage == "bad arrays":
        (state_dir / "epoch-1.npz").write_bytes(b"truncated")
    else:
        (state_dir / "state.json").write_text(damage)
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, "--no-show")
    assert_user_error(result, "training state", "--fresh")


@pytest.mark.slow
def test_fresh_gets_past_a_damaged_training_state(tmp_path):
    (tmp_path / "training_state").mkdir()
    (tmp_path / "training_state" / "state.json").write_text("not json")
    result = run_main("--data", TINY_CSV, "--output-dir", tmp_path, *TINY_FLAGS, "--no-baseline", "--fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" not in result.stdout and (tmp_path / "metrics.json").is_file()


# Far more epochs than the test waits for, of many small batches: the run is surely still training when Ctrl-C
# (or a second run into its directory) comes (with LONG_RUN's few short epochs it could finish first on a fast
# machine).
CTRL_C_RUN = [*TINY_FLAGS, "--no-baseline", "--epochs", "60", "--patience", "60", "--batch-size", "8"]


@pytest.mark.slow
def test_ctrl_c_keeps_the_best_weights_and_still_reports(tmp_path):
    process = start_training(tmp_path, CTRL_C_RUN)
    wait_for_first_epoch(process, tmp_path)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-3000:]
    assert "Interrupted" in stderr and "Traceback" not in stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["training"]["interrupted"] is True
    assert 1 <= metrics["training"]["epochs_run"] < 60
    for name in ("model.keras", "roc_curve.png", "confusion_matrix.png", "training_history.png", "errors.csv"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "training_state" / "state.json").is_file(), "kept so the same command continues"
    # The saved model holds the best epoch's weights that the training state names: its output layer's kernel
    # and bias are the last two of the state's best weights.
    state = json.loads((tmp_path / "training_state" / "state.json").read_text())
    assert 1 <= state["best_epoch"] <= state["epoch"]
    assert state["history"]["val_loss"][state["best_epoch"] - 1] == min(state["history"]["val_loss"])
    with np.load(tmp_path / "training_state" / state["arrays"]) as arrays:
        best = [arrays[f"best_{index}"] for index in range(sum(name.startswith("best_") for name in arrays))]
    import sentiment_analysis as sa
    saved = layer_named(sa.load_model(tmp_path / "model.keras"), "probability").get_weights()
    for saved_weight, best_weight in zip(saved, best[-2:]):
        np.testing.assert_array_equal(saved_weight, best_weight)


def layer_named(model, name):
    """The layer of that name anywhere inside a saved model (the classifier is nested in it)."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            found = layer_named(layer, name)
            if found is not None:
                return found
    return None


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus_with_the_default_batch_size(tmp_path):
    """The tiny CSV (about 160 training reviews) with the default --batch-size of 128 per replica: a global batch
    of 256, larger than the data, still trains on two replicas, and every review is counted."""
    result = train_tiny_in_process(tmp_path, "--no-baseline", "--cpu-replicas", "2", "--batch-size", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["environment"]["replicas"] == 2
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == metrics["data"]["test"]


@pytest.mark.slow
def test_two_replicas_train_the_model_of_one_device_with_the_same_global_batch(tmp_path):
    """Moving from one device to two changes nothing but the speed: --batch-size 16 on two replicas sees the same
    batches as --batch-size 32 on one (the uneven last batches padded with weight-0 copies), so the history
    and the test figures agree to float tolerance. (No dropout: each replica draws its own masks.)"""
    flags = ["--no-baseline", "--epochs", "2", "--patience", "2", "--spatial-dropout", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_tiny_in_process(one, *flags, "--batch-size", "32").returncode == 0
    result = train_tiny_in_process(two, *flags, "--batch-size", "16", "--cpu-replicas", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    histories = [pd.read_csv(path / "history.csv") for path in (one, two)]
    pd.testing.assert_frame_equal(histories[0], histories[1], rtol=1e-4)
    tests = [json.loads((path / "metrics.json").read_text())["test"] for path in (one, two)]
    assert tests[0]["confusion_matrix"] == tests[1]["confusion_matrix"]
    assert tests[0]["roc_auc"] == pytest.approx(tests[1]["roc_auc"], abs=1e-3)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_workers(output_dirs, flags, data=TINY_CSV):
    """The README's one-machine cluster: the same command on two ports of 127.0.0.1, one TF_CONFIG each."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(output_dirs))]
    workers = []
    for index, output_dir in enumerate(output_dirs):
        config = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        workers.append(start_training(output_dir, flags, env_extra={"TF_CONFIG": config}, data=data))
    return workers


def run_two_workers(output_dirs, flags, data=TINY_CSV, attempts=3, reset=None):
    """Run the workers to the end: (exit status, stdout, stderr) of each. The free ports are closed before the
    workers bind them (TensorFlow's gRPC server will not share a port that a test holds), so another process may
    take one in between: then the cluster is started again on new ports, with clean output directories (or as
    `reset()` makes them again)."""
    for _ in range(attempts):
        workers = start_workers(output_dirs, flags, data)
        try:
            outputs = [worker.communicate(timeout=400) for worker in workers]
        finally:
            for worker in workers:
                worker.kill()
        results = [(worker.returncode, stdout, stderr) for worker, (stdout, stderr) in zip(workers, outputs)]
        if not any("Could not start gRPC server" in stderr for _, _, stderr in results):
            return results
        for output_dir in output_dirs:
            shutil.rmtree(output_dir, ignore_errors=True)
        if reset is not None:
            reset()
    return results


# The default --batch-size: a global batch of 256, more than the tiny CSV holds, still trains on two workers.
CLUSTER_RUN = [*TINY_FLAGS, "--no-baseline", "--batch-size", "128"]


@pytest.mark.slow
def test_two_workers_train_together_and_only_the_chief_writes(tmp_path):
    chief, other = tmp_path / "worker-0", tmp_path / "worker-1"
    results = run_two_workers([chief, other], CLUSTER_RUN)
    for returncode, stdout, stderr in results:
        assert returncode == 0, stderr[-3000:]
        assert "MultiWorkerMirroredStrategy with 2 replica(s) on 2 worker(s)" in stdout
    metrics = json.loads((chief / "metrics.json").read_text())
    assert metrics["environment"]["strategy"] == "MultiWorkerMirroredStrategy"
    assert metrics["environment"]["replicas"] == 2 and metrics["training"]["epochs_run"] == 1
    assert (chief / "model.keras").is_file() and not (chief / "training_state").exists()
    assert "the chief writes" in results[1][1]
    assert list(other.iterdir()) == [], "a worker that is not the chief writes nothing"
    # Both workers ran the same steps on the same batches, split between them.
    epoch_lines = [[line for line in stdout.splitlines() if "val_loss" in line] for _, stdout, _ in results]
    assert len(epoch_lines[0]) == 1
    assert epoch_lines[0][0].split(" - loss")[1] == epoch_lines[1][0].split(" - loss")[1]


def tiny_shards(directory, count=4):
    """The tiny CSV cut into `count` files, row i into file i % count."""
    directory.mkdir()
    rows = pd.read_csv(TINY_CSV)
    for index in range(count):
        rows.iloc[index::count].to_csv(directory / f"part-{index}.csv", index=False)
    return directory


def test_each_worker_of_a_cluster_given_several_files_owns_the_training_texts_of_its_files(tmp_path):
    import sentiment_analysis as sa

    config = sa.TrainConfig(data=str(tiny_shards(tmp_path / "shards")))
    data = sa.load_dataset(config)
    splits = sa.split_dataset(data, config.test_fraction, config.validation_fraction, config.seed)
    by_file = {}
    for index in range(4):
        texts = set(pd.read_csv(tmp_path / "shards" / f"part-{index}.csv")["reviews"])
        by_file[index] = {text for text in splits.train.texts if text in texts}
    shares = [sa.DataShare(worker, 2, data.file_starts) for worker in range(2)]
    owned = [set(splits.train.texts[share.owns(splits.train.texts)]) for share in shares]
    assert [share.files() for share in shares] == [[0, 2], [1, 3]]
    assert owned[0] == by_file[0] | by_file[2] and owned[1] == by_file[1] | by_file[3]  # files i, i + n, ...
    assert not owned[0] & owned[1] and len(owned[0]) + len(owned[1]) == len(splits.train.texts)
    unlabelled = sa.gather_unlabelled(data, splits, None, None)
    restricted, _ = shares[1].restrict(splits, unlabelled, data, len(splits.train.labels))
    assert set(restricted.train.texts) == owned[1] and restricted.validation is splits.validation
    assert (restricted.train.labels == splits.train.labels[shares[1].owns(splits.train.texts)]).all()
    alone = sa.DataShare()  # one process: every text its own, no cluster sums
    assert alone.owns(splits.train.texts).all() and all(map(operator.is_, alone.restrict(splits, unlabelled, data, 0),
                                                                  (splits, unlabelled)))
    assert alone.most(3) == 3 and (alone.summed(np.arange(3)) == np.arange(3)).all()


def test_a_worker_reading_only_its_own_files_gets_the_splits_the_chief_gives_it(tmp_path):
    """A cluster's chief reads every file and tells the others each of their texts' fate (WorkersPlan); a worker
    that reads only its own files then holds the same rows of each split, in the same order, as the chief's
    view of that worker's files, and its part of the unlabelled texts."""
    import sentiment_analysis as sa

    shards = tiny_shards(tmp_path / "shards")
    for index in range(4):  # a few rows without a label: unlabelled text of --data
        part = pd.read_csv(shards / f"part-{index}.csv")
        part.loc[part.index[:3], "sentiment"] = None
        part.to_csv(shards / f"part-{index}.csv", index=False)
    extra = tmp_path / "more.txt"
    extra.write_text("An unlabelled line.\nAnother one, quite different.\nA third unlabelled review.\n")
    config = sa.TrainConfig(data=str(shards), unlabelled=str(extra), max_rows=180)
    data = sa.load_dataset(config, keep_places=True)
    splits = sa.split_dataset(data, config.test_fraction, config.validation_fraction, config.seed)
    unlabelled = sa.gather_unlabelled(data, splits, config.unlabelled, None)
    plan = sa.WorkersPlan.of(data, splits, unlabelled, {})
    chief = sa.DataShare(0, 2, data.file_starts)
    mine, my_splits, my_unlabelled = sa.load_share(config, None, [1, 3], plan)
    assert mine.rows_read == data.file_rows[1] + data.file_rows[3] < config.max_rows
    for name in ("train", "validation", "test"):
        whole, own = getattr(splits, name), getattr(my_splits, name)
        theirs = ~chief.owns(whole.texts)  # the chief's view of worker 1's files
        assert list(own.texts) == list(whole.texts[theirs]) and len(own.texts) > 0
        assert (own.labels == whole.labels[theirs]).all()
    worker = sa.DataShare(1, 2, mine.file_starts)
    assert worker.owns(my_splits.train.texts).all() and worker.owns(mine.unlabelled).all()
    _, chiefs_part = chief.restrict(splits, unlabelled, data, len(splits.train.labels))
    _, own_part = worker.restrict(my_splits, my_unlabelled, mine, len(splits.train.labels))
    assert len(own_part.texts) > 0 and len(chiefs_part.texts) > 0
    assert set(own_part.texts) | set(chiefs_part.texts) == set(unlabelled.texts)
    assert not set(own_part.texts) & set(chiefs_part.texts)
    changed = sa.WorkersPlan({**plan.record, "file_stored": [count + 1 for count in plan.record["file_stored"]]},
                             plan.fates, plan.file_kept)
    with pytest.raises(sa.UserError, match="not the ones the chief read"):
        sa.load_share(config, None, [1, 3], changed)


def test_fewer_files_than_workers_is_a_clear_error(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(TINY_CSV, shards / "only.csv")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    result = train_tiny_in_process(tmp_path / "out", data=shards)
    assert_user_error(result, "1 file(s) for 2 workers", "at least 2")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_workers_given_four_files_each_train_on_their_own(tmp_path):
    chief, other = tmp_path / "worker-0", tmp_path / "worker-1"
    results = run_two_workers([chief, other], [*TINY_FLAGS], data=tiny_shards(tmp_path / "shards"))
    shares = []
    for returncode, stdout, stderr in results:
        assert returncode == 0, stderr[-3000:]
        line, = [line for line in stdout.splitlines() if line.startswith("This worker trains on its share")]
        shares.append(line)
    assert "from files 1, 3 of 4" in shares[0] and "from files 2, 4 of 4" in shares[1]
    # The chief reads every file; the other worker only its own two (50 rows each), told their fates by the chief.
    reads = [[line for line in stdout.splitlines() if line.startswith("Read ")] for _, stdout, _ in results]
    assert reads[0][0].startswith("Read 200 rows from ")
    assert reads[1][0].startswith("Read 100 rows from this worker's files (2, 4) of ")
    assert reads[0][0].split("; ", 1)[1] == reads[1][0].split("as the chief counts them: ", 1)[1]
    # Word2Vec (the default embedding) trains on the chief alone: the other worker starts from the chief's.
    assert "Training Word2Vec" in results[0][1] and "Training Word2Vec" not in results[1][1]
    counts = [[int(word) for word in line.split(":")[1].split()[:4:3]] for line in shares]  # own, of all
    assert counts[0][1] == counts[1][1] == counts[0][0] + counts[1][0] and min(counts[0][0], counts[1][0]) > 0
    metrics = json.loads((chief / "metrics.json").read_text())
    assert metrics["data"]["train"] == counts[0][1] and metrics["training"]["epochs_run"] == 1
    # The same steps on both (the busier worker's), the losses summed over the cluster: the same epoch line.
    epoch_lines = [[line for line in stdout.splitlines() if "val_loss" in line] for _, stdout, _ in results]
    assert len(epoch_lines[0]) == 1
    assert epoch_lines[0][0].split(" - loss")[1] == epoch_lines[1][0].split(" - loss")[1]
    assert list(other.iterdir()) == [], "a worker that is not the chief writes nothing"


@pytest.mark.slow
def test_a_worker_waiting_for_a_chief_that_stopped_reading_ends_with_a_clear_error(tmp_path):
    # The chief's file 3 has other columns: the chief stops with its error, the other worker (files 2 and 4) was
    # waiting for the chief's plan, and says that another worker stopped.
    shards = tiny_shards(tmp_path / "shards")
    pd.read_csv(shards / "part-2.csv").rename(columns={"sentiment": "label"}).to_csv(shards / "part-2.csv",
                                                                                   index=False)
    chief, other = tmp_path / "worker-0", tmp_path / "worker-1"
    started = time.monotonic()
    results = run_two_workers([chief, other], [*TINY_FLAGS], data=shards)
    assert_user_error(subprocess.CompletedProcess([], *results[0]), "part-2.csv has the columns")
    assert_user_error(subprocess.CompletedProcess([], *results[1]), "another worker", "start every worker again")
    assert time.monotonic() - started < 300


@pytest.mark.slow
def test_workers_that_saved_different_epochs_refuse_to_resume(crashed, tmp_path):
    # A state saved by a single run: worker 0 (the chief) finds it and would resume, worker 1 has none.
    chief, other = crashed, tmp_path / "worker-1"
    saved = shutil.copytree(crashed, tmp_path / "saved")
    for returncode, _, stderr in run_two_workers([chief, other], [*TINY_FLAGS, *SMALL_BATCH_FLAGS],
                                                 reset=lambda: shutil.copytree(saved, chief)):
        assert_user_error(subprocess.CompletedProcess([], returncode, "", stderr), "different epochs", "--fresh")


def start_workers_past_their_first_epoch(output_dirs, flags, attempts=3):
    """Start the cluster and wait until the last worker has saved its first epoch: the workers, running. As in
    run_two_workers, a port taken by another process between the test's check and the worker's bind starts the
    cluster again on new ports, with clean output directories."""
    state_file = output_dirs[-1] / f"training_state-worker-{len(output_dirs) - 1}" / "state.json"
    for _ in range(attempts):
        workers = start_workers(output_dirs, flags)
        deadline = time.monotonic() + 240
        while not state_file.exists() and all(worker.poll() is None for worker in workers):
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.02)
        if state_file.exists():
            return workers
        for worker in workers:
            worker.kill()
        errors = [worker.communicate()[1] for worker in workers]
        assert any("Could not start gRPC server" in stderr for stderr in errors), errors[-1][-3000:]
        for output_dir in output_dirs:
            shutil.rmtree(output_dir, ignore_errors=True)
    raise AssertionError(f"the cluster could not bind free ports in {attempts} attempts")


@pytest.mark.slow
def test_a_crashed_worker_stops_the_others_with_a_clear_error(tmp_path):
    chief, other = tmp_path / "worker-0", tmp_path / "worker-1"
    workers = start_workers_past_their_first_epoch([chief, other], [*CLUSTER_RUN, "--epochs", "8", "--patience", "8"])
    try:
        workers[1].kill()
        _, stderr = workers[0].communicate(timeout=240)
    finally:
        for worker in workers:
            worker.kill()
    assert_user_error(subprocess.CompletedProcess([], workers[0].returncode, "", stderr),
                      "another worker", "start all workers again")
    assert (chief / "training_state" / "state.json").is_file(), "kept so the cluster can resume"
    assert not (chief / "metrics.json").exists()


@pytest.mark.parametrize("tf_config, fragment", [
    ("{not json", "TF_CONFIG is not a cluster description"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "TF_CONFIG is not a cluster description"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "task index 3"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "only chief"),
])
def test_bad_tf_config_is_a_clear_error(tmp_path, monkeypatch, tf_config, fragment):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    result = train_tiny_in_process(tmp_path / "out")
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_cpu_replicas_with_tf_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}')
    result = train_tiny_in_process(tmp_path, "--cpu-replicas", "2")
    assert_user_error(result, "--cpu-replicas", "TF_CONFIG")


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    first = start_training(tmp_path, CTRL_C_RUN)  # far longer than the test: it cannot finish first
    try:
        wait_for_first_epoch(first, tmp_path)
        second = train_tiny_in_process(tmp_path, "--no-baseline", "--seed", "2")
        line = assert_user_error(second, "another run is writing to", str(tmp_path), f"process {first.pid}")
        assert "--output-dir" in line
        lock = json.loads((tmp_path / ".run.lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname() and lock["started"]
    finally:
        first.kill()
        first.wait()
    # The second run touched nothing of the first's: its training state is still there to resume.
    assert (tmp_path / "training_state" / "state.json").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_a_lock_of_a_live_process_or_another_host_refuses_and_a_stale_one_is_taken_over(tmp_path):
    import platform

    lock = tmp_path / ".run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": platform.node(), "started": "2026-12-01 10:00:00"}))
    assert_user_error(train_tiny_in_process(tmp_path), "another run is writing to", f"process {os.getpid()}",
                      "2026-12-01 10:00:00")
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-machine", "started": "2026-12-01 10:00:00"}))
    assert_user_error(train_tiny_in_process(tmp_path), "on some-other-machine", "delete")
    assert not (tmp_path / "metrics.json").exists()
    # A process that has ended leaves its lock behind (as after SIGKILL): the next run takes it over.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock.write_text(json.dumps({"pid": ended.pid, "host": platform.node(), "started": "2026-12-01 10:00:00"}))
    result = train_tiny_in_process(tmp_path, "--no-baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over the lock of an earlier run that no longer runs (process {ended.pid}" in result.stderr
    assert (tmp_path / "metrics.json").exists() and not lock.exists()


@pytest.mark.slow
def test_a_full_disk_while_training_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch):
    """ENOSPC from the writer of the training state after the second epoch: one line naming the directory and
    the space a run needs, exit 2, no temporary file; the first epoch's state stays, and a rerun resumes."""
    import errno as errno_module

    import sentiment_analysis as sa

    real_savez, saves = np.savez, []

    def savez_until_full(path, **arrays):
        saves.append(path)
        if len([saved for saved in saves if "epoch-" in str(saved)]) == 2:  # the training state's, not the cache's
            with open(path, "wb") as partial:
                partial.write(b"half an array")
            raise OSError(errno_module.ENOSPC, "No space left on device")
        real_savez(path, **arrays)

    monkeypatch.setattr(sa.np, "savez", savez_until_full)
    result = train_tiny_in_process(tmp_path, "--no-baseline", "--epochs", "3", "--patience", "3")
    line = assert_user_error(result, f"no space left in {tmp_path / 'training_state'}", "this run's outputs need about",
                             "MB are free", "resumes after the last finished epoch")
    assert result.returncode == 2
    leftovers = [path.name for path in tmp_path.rglob("*") if path.name.startswith((".tmp", ".old"))]
    assert leftovers == [] and not (tmp_path / "metrics.json").exists() and not (tmp_path / ".run.lock").exists()
    assert json.loads((tmp_path / "training_state" / "state.json").read_text())["epoch"] == 1
    monkeypatch.setattr(sa.np, "savez", real_savez)
    result = train_tiny_in_process(tmp_path, "--no-baseline", "--epochs", "3", "--patience", "3")
    assert result.returncode == 0 and "Resuming after epoch 1" in result.stdout, line


@pytest.mark.slow
def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    import collections

    import sentiment_analysis as sa

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sa.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5_000_000, 5_000_000))
    result = train_tiny_in_process(tmp_path)
    assert_user_error(result, f"not enough space in {tmp_path}", "need about", "5 MB are free")
    assert "Epoch 1" not in result.stdout and not (tmp_path / "training_state").exists()


@pytest.mark.slow
def test_a_full_disk_while_writing_the_figures_is_one_line(tmp_path, monkeypatch):
    """ENOSPC after training, from the figure writer: one line naming the file; no temporary file is left."""
    import errno as errno_module

    import matplotlib.figure

    def full(self, path, **kwargs):
        with open(path, "wb") as partial:
            partial.write(b"\x89PNG half")
        raise OSError(errno_module.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    result = train_tiny_in_process(tmp_path, "--no-baseline")
    line = assert_user_error(result, f"no space left in {tmp_path} while writing confusion_matrix.png", "need about")
    assert result.returncode == 2 and "resumes" not in line  # training had finished: its state is gone
    assert [path.name for path in tmp_path.rglob(".tmp*")] == [] and not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_resumed_run_ends_like_one_never_stopped(tmp_path, small_batch_run):
    """SIGTERM (a scheduler's notice): the run stops after its current step, saves the state at that step and
    exits 143 without evaluating; the same command then resumes mid-epoch, skipping the batches
    done, and ends with the history and test figures of a run that was never stopped."""
    stopped = tmp_path / "stopped"
    process = start_training(stopped, [*TINY_FLAGS, *SMALL_BATCH_FLAGS])
    wait_for_first_epoch(process, stopped)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "Stopped by SIGTERM after batch" in stderr and "Traceback" not in stderr
    state = json.loads((stopped / "training_state" / "state.json").read_text())
    # Stopped after a step of the epoch, its place saved (no wall-clock limit: a loaded machine could break one).
    steps = int(stderr.split("Stopped by SIGTERM after batch ")[1].split(" of ")[1].split()[0])
    assert 1 <= state["epoch_progress"]["batches"] <= steps and state["epoch"] >= 1
    assert not (stopped / "metrics.json").exists() and not (stopped / "model.keras").exists()
    assert not (stopped / ".run.lock").exists()

    resumed = train_tiny_in_process(stopped, *SMALL_BATCH_FLAGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming in epoch {state['epoch'] + 1} after batch {state['epoch_progress']['batches']}" in resumed.stdout
    whole, _ = small_batch_run
    pd.testing.assert_frame_equal(pd.read_csv(stopped / "history.csv"), pd.read_csv(whole / "history.csv"),
                                  check_exact=True)
    assert (json.loads((stopped / "metrics.json").read_text())["test"]
            == json.loads((whole / "metrics.json").read_text())["test"])


# --- The cache of token ids: reused by the same command, made again when the data or the settings change --------


def prepared(config, cache_dir, capsys, killed_before_training=False):
    import sentiment_analysis as sa

    data = sa.load_dataset(config)
    derived = sa.Derived.of(config, sa.ARCHITECTURES[config.arch])
    cache = sa.InputsCache.of(cache_dir, sa.training_fingerprint(config, derived), 0)
    inputs = sa.prepare_inputs(split(data, config), config, sa.ARCHITECTURES[config.arch], derived, 1, 2,
                               cache=cache)
    inputs.embedding_start.result()
    if not killed_before_training:
        cache.save_embedding(inputs)  # as run_training does, once the free space is checked
    return inputs, capsys.readouterr().out


def test_token_ids_are_written_as_they_come_and_read_back_from_the_file(tmp_path, monkeypatch):
    import sentiment_analysis as sa

    parts = [sa.ReviewIds.from_lengths(np.array([3, 4, 5], np.int32), np.array([2, 0, 1]), 10),
             sa.ReviewIds.from_lengths(np.zeros(0, np.int32), np.zeros(0, np.int64), 10),
             sa.ReviewIds.from_lengths(np.array([7], np.int32), np.array([1]), 10)]
    with sa.ReviewIds.writer(tmp_path / "ids.int32") as keep:
        for part in parts:
            keep(part)
    opened = sa.ReviewIds.open(tmp_path / "ids.int32", 10)
    assert opened == sa.ReviewIds.concatenate(parts, 10) and opened.lengths.tolist() == [2, 0, 1, 1]
    assert isinstance(opened.tokens, sa.FileArray)  # read from the file where used, not loaded
    assert opened.take(np.array([3, 1, 0])) == sa.ReviewIds.from_lengths(np.array([7, 3, 4]), np.array([1, 0, 2]), 10)
    np.testing.assert_array_equal(opened.id_counts(10), np.bincount([3, 4, 5, 7], minlength=10))
    monkeypatch.setattr(sa, "TOKEN_CHUNK", 3)  # counted a chunk at a time: the same counts
    np.testing.assert_array_equal(opened.id_counts(), np.bincount([3, 4, 5, 7]))
    np.testing.assert_array_equal(opened.padded(np.array([3, 0])), [[7, 0], [3, 4]])
    assert [row.tolist() for row in opened] == [[3, 4], [], [5], [7]]
    with sa.ReviewIds.writer(tmp_path / "none.int32"):
        pass
    assert len(sa.ReviewIds.open(tmp_path / "none.int32", 10)) == 0
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".tmp")] == []


def test_token_ids_that_would_not_fit_are_refused_before_tokenizing(tmp_path, monkeypatch):
    import collections

    import sentiment_analysis as sa

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sa.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 40_000, 40_000))
    cache = sa.InputsCache.of(tmp_path / "training_state" / sa.INPUTS_CACHE, {}, 0)
    texts = np.array(["a review of twenty-one"] * 1000, dtype=object)  # at most 24 ids each: 104 bytes
    with pytest.raises(sa.UserError, match=f"not enough space in {tmp_path}: .* need about 0 MB, 0 MB are free"):
        cache.start([texts], 500)
    assert not (tmp_path / "training_state").exists()
    cache.start([texts[:300]], 500)  # 31,200 bytes fit
    assert cache.directory.is_dir()


def test_the_token_ids_are_cached_reused_and_made_again_when_the_data_changes(tmp_path, capsys):
    import sentiment_analysis as sa

    data, cache_dir = tmp_path / "reviews.csv", tmp_path / "training_state" / sa.INPUTS_CACHE
    shutil.copy(TINY_CSV, data)
    config = sa.TrainConfig(data=str(data), vocab_size=2000, max_length=80)
    first, out = prepared(config, cache_dir, capsys)
    assert "Training Word2Vec" in out and "Reusing" not in out and (cache_dir / "inputs.json").is_file()
    second, out = prepared(config, cache_dir, capsys)
    assert "Reusing the token ids" in out and "Training Word2Vec" not in out
    for name in sa.CACHED_IDS:
        assert getattr(first, name) == getattr(second, name)
    np.testing.assert_array_equal(first.embedding_matrix, second.embedding_matrix)
    assert second.vocabulary == first.vocabulary and second.truncated_reviews == first.truncated_reviews
    texts = sa.load_dataset(config).texts[:20]
    np.testing.assert_array_equal(first.vectorizer(texts), second.vectorizer(texts))  # the same tokenizer

    rows = pd.read_csv(data)
    rows.loc[0, "reviews"] = "a wholly new review of a film nobody had seen before"
    rows.to_csv(data, index=False)
    changed, out = prepared(config, cache_dir, capsys)
    assert "other data or settings: preparing them again" in out and "Training Word2Vec" in out
    assert "Reusing" in prepared(config, cache_dir, capsys)[1]  # the cache now holds the new data's ids
    other_settings = dataclasses_replace(config, max_length=60)
    assert "other data or settings" in prepared(other_settings, cache_dir, capsys)[1]

    (cache_dir / "train_ids.int32").write_bytes(b"truncated")
    again, out = prepared(other_settings, cache_dir, capsys)
    assert "cannot be read" in out and "Training Word2Vec" in out
    assert again.train_ids == prepared(other_settings, cache_dir, capsys)[0].train_ids

    # Killed after tokenizing, before training: the ids are kept, the starting embedding is made again.
    shutil.rmtree(cache_dir)
    killed, out = prepared(config, cache_dir, capsys, killed_before_training=True)
    assert (cache_dir / "inputs.json").is_file() and not (cache_dir / "embedding.json").exists()
    resumed, out = prepared(config, cache_dir, capsys)
    assert "Reusing the token ids and vocabulary cached" in out and "Training Word2Vec" in out
    assert resumed.train_ids == killed.train_ids and resumed.test_ids == killed.test_ids
    np.testing.assert_array_equal(resumed.embedding_matrix, killed.embedding_matrix)  # the same seed


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_a_moved_data_file_still_resumes_and_a_changed_one_does_not(tmp_path):
    moved = tmp_path / "moved.csv"
    shutil.copy(TINY_CSV, moved)
    base = fingerprint_of(config_for("--data", str(TINY_CSV)))
    assert fingerprint_of(config_for("--data", str(moved))) == base
    moved.write_text(TINY_CSV.read_text(encoding="utf-8") + "one more review,positive\n", encoding="utf-8")
    assert fingerprint_of(config_for("--data", str(moved))) != base


@pytest.mark.slow
def test_a_run_interrupted_while_tokenizing_starts_again_with_the_same_command(tmp_path, monkeypatch):
    import sentiment_analysis as sa

    real_vectorize, calls = sa.vectorize, []

    def interrupted_vectorize(vectorizer, texts, max_length, into=None):
        calls.append(len(texts))
        if len(calls) == 2:  # Ctrl-C while the validation split is tokenized
            raise KeyboardInterrupt
        return real_vectorize(vectorizer, texts, max_length, into)

    monkeypatch.setattr(sa, "vectorize", interrupted_vectorize)
    result = train_tiny_in_process(tmp_path, "--no-baseline")
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if line.startswith("Interrupted before training")]
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model.keras").exists()
    assert not (tmp_path / "training_state" / sa.INPUTS_CACHE / "inputs.json").exists()  # not all ids written
    monkeypatch.setattr(sa, "vectorize", real_vectorize)
    result = train_tiny_in_process(tmp_path, "--no-baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" not in result.stdout and (tmp_path / "metrics.json").is_file()
