"""Crash and Ctrl-C during training, and the multi-device path on logical CPU devices."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import SCRIPT, TINY_CSV, TINY_FLAGS, assert_user_error, train_tiny

# Many epochs with patience to match, so the run is still training when the test stops it.
LONG_RUN = [*TINY_FLAGS, "--no-baseline", "--epochs", "8", "--patience", "8"]


def start_training(output_dir, flags):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "TF_CONFIG")}
    command = [sys.executable, str(SCRIPT), "--data", str(TINY_CSV), "--output-dir", str(output_dir), *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_first_epoch(process, output_dir, timeout=240):
    state_file = output_dir / "training_state" / "state.json"
    deadline = time.monotonic() + timeout
    while not state_file.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.02)


def test_killed_run_resumes_where_it_stopped(tmp_path):
    process = start_training(tmp_path, LONG_RUN)
    wait_for_first_epoch(process, tmp_path)
    process.kill()  # SIGKILL: no clean-up code runs, as in a crash or a power cut.
    process.wait()
    saved = json.loads((tmp_path / "training_state" / "state.json").read_text())
    completed = saved["epoch"]
    assert 1 <= completed < 8
    assert not (tmp_path / "metrics.json").exists()

    result = train_tiny(tmp_path, "--no-baseline", "--epochs", "8", "--patience", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming after epoch {completed}" in result.stdout
    assert f"Epoch {completed + 1}/8" in result.stdout and "Epoch 1/8" not in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["training"]["resumed_after_epoch"] == completed
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 9))
    assert history["loss"].iloc[0] == saved["history"]["loss"][0]
    assert not (tmp_path / "training_state").exists()


def test_resume_with_other_settings_is_refused_and_fresh_starts_over(tmp_path):
    process = start_training(tmp_path, LONG_RUN)
    wait_for_first_epoch(process, tmp_path)
    process.kill()
    process.wait()
    result = train_tiny(tmp_path, "--no-baseline", "--epochs", "8", "--patience", "8", "--units", "8")
    assert result.returncode == 2 and "--fresh" in result.stderr and "Traceback" not in result.stderr
    result = train_tiny(tmp_path, "--no-baseline", "--units", "8", "--fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" not in result.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["training"]["resumed_after_epoch"] == 0


def test_ctrl_c_keeps_the_best_weights_and_still_reports(tmp_path):
    process = start_training(tmp_path, LONG_RUN)
    wait_for_first_epoch(process, tmp_path)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-3000:]
    assert "Interrupted" in stderr and "Traceback" not in stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["training"]["interrupted"] is True
    assert 1 <= metrics["training"]["epochs_run"] < 8
    for name in ("model.keras", "roc_curve.png", "confusion_matrix.png", "training_history.png", "errors.csv"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "training_state" / "state.json").is_file(), "kept so the same command continues"


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    result = train_tiny(tmp_path, "--no-baseline", "--cpu-replicas", "2", "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["environment"]["replicas"] == 2
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0


def test_multi_worker_config_is_refused_clearly(tmp_path):
    cluster = json.dumps({"cluster": {"worker": ["127.0.0.1:23456", "127.0.0.1:23457"]},
                          "task": {"type": "worker", "index": 0}})
    result = train_tiny(tmp_path, env_extra={"TF_CONFIG": cluster})
    assert_user_error(result, "TF_CONFIG", "keras-team/keras#20585")
    assert not any(tmp_path.iterdir())
