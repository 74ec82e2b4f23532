"""Shared helpers: the script in-process (`run_main`) for most tests, in a subprocess (`run_script`) where the
promise is about the process itself (no traceback, no TensorFlow on --help, signals, clusters)."""

import contextlib
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: each test process builds its own shared runs
    fcntl = None

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sentiment_analysis.py"
TINY_CSV = ROOT / "tests" / "data" / "tiny_imdb.csv"
# Small enough to train in seconds on two cores; the figures and files are the same as a full run's.
TINY_FLAGS = ["--epochs", "1", "--vocab-size", "2000", "--max-length", "80", "--batch-size", "32", "--no-show"]

sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """The slow marker (tests that train a model or start the script many times: `-m "not slow"` leaves the
    quick tier), and two logical CPU devices for this test process, so that in-process tests can mirror a model
    across two replicas. (TensorFlow fixes its devices when its runtime starts, so this must come first.)"""
    config.addinivalue_line("markers", "slow: trains a model or runs the script at length (deselect with "
                                       "-m 'not slow' for the quick tier)")
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # pytest-xdist's controller: it runs no test, its workers configure themselves
    import sentiment_analysis  # imports TensorFlow without its start-up lines (see the script's top)

    tf = sentiment_analysis.tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def split(data, config):
    """split_dataset with the config's fractions and seed, as a run splits."""
    import sentiment_analysis as sa

    return sa.split_dataset(data, config.test_fraction, config.validation_fraction, config.seed)


def run_script(*args, stdin=None, timeout=300, env_extra=None, cwd=None):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "TF_CONFIG")}
    env.update({"PYTHONUNBUFFERED": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env, cwd=cwd or ROOT)


def run_main(*args, stdin=""):
    """sentiment_analysis.main(args) in this process, as a CompletedProcess: exit status, stdout, stderr."""
    import sentiment_analysis

    stdout, stderr = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = sentiment_analysis.main([str(arg) for arg in args])
            except SystemExit as exit_:  # argparse's usage errors and --help
                returncode = exit_.code
    finally:
        sys.stdin = old_stdin
    return subprocess.CompletedProcess(list(args), returncode, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(autouse=True)
def no_display_no_cluster(monkeypatch):
    """In-process runs see neither a display nor a cluster description, like the subprocess runs."""
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def train_tiny(output_dir, *extra, data=TINY_CSV, **kwargs):
    """A tiny training run in a subprocess, as a user runs it."""
    return run_script("--data", data, "--output-dir", output_dir, *TINY_FLAGS, *extra, **kwargs)


def train_tiny_in_process(output_dir, *extra, data=TINY_CSV):
    return run_main("--data", data, "--output-dir", output_dir, *TINY_FLAGS, *extra)


def build_once(tmp_path_factory, name, build):
    """`build(directory)` once per test session, its result shared by every test that reads it, also when
    pytest-xdist (`-n 2`) runs the tests in several processes: the first process that needs it builds it under
    a file lock in the directory all of them share, the others wait for it and read its pickled result."""
    root = tmp_path_factory.getbasetemp()
    if fcntl is None or "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    root = root.parent  # pytest-N/, above each worker's popen-gwK/
    directory, result_file = root / name, root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result_file.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            result_file.write_bytes(pickle.dumps(build(directory)))
        return pickle.loads(result_file.read_bytes())


def trained(output_dir, *extra):
    result = train_tiny(output_dir, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """One tiny training run, in a subprocess as a user runs it, shared by the end-to-end and predict tests."""
    return build_once(tmp_path_factory, "trained", trained)[0]


# Six epochs of many small batches (about 26 an epoch): a run stopped after its first epoch has several still to
# run, so a test that stops it there does not race the run's end on a loaded machine; short enough to run whole.
SMALL_BATCH_EPOCHS = 6
SMALL_BATCH_TRAINING = ["--epochs", str(SMALL_BATCH_EPOCHS), "--patience", str(SMALL_BATCH_EPOCHS), "--batch-size", "8"]
SMALL_BATCH_FLAGS = ["--no-baseline", *SMALL_BATCH_TRAINING]


@pytest.fixture(scope="session")
def small_batch_run(tmp_path_factory):
    """One uninterrupted tiny run of SMALL_BATCH_FLAGS in a subprocess: its output directory and its stdout, read
    by the TensorBoard test and compared with by the resumed runs of the kill and SIGTERM tests."""
    return build_once(tmp_path_factory, "small_batches", lambda output_dir: trained(output_dir, *SMALL_BATCH_FLAGS))


def assert_user_error(result, *fragments):
    """A user mistake: non-zero exit, exactly one line on stderr starting with 'error:', no traceback."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in error_lines[0].lower(), error_lines[0]
    return error_lines[0]


def read_scalars(log_dir):
    """The scalars of a TensorBoard log directory as TensorBoard itself reads them: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import tensorflow as tf

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in events.Tensors(tag)}
            for tag in events.Tags()["tensors"]}
