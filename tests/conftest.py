"""Shared helpers: run the script in a subprocess with tiny settings, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sentiment_analysis.py"
TINY_CSV = ROOT / "tests" / "data" / "tiny_imdb.csv"
# Small enough to train in seconds on two cores; the figures and files are the same as a full run's.
TINY_FLAGS = ["--epochs", "1", "--vocab-size", "2000", "--max-length", "80", "--batch-size", "32", "--no-show"]

sys.path.insert(0, str(ROOT))


def run_script(*args, stdin=None, timeout=300, env_extra=None, cwd=None):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "TF_CONFIG")}
    env.update({"PYTHONUNBUFFERED": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env, cwd=cwd or ROOT)


def train_tiny(output_dir, *extra, data=TINY_CSV, **kwargs):
    return run_script("--data", data, "--output-dir", output_dir, *TINY_FLAGS, *extra, **kwargs)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """One tiny training run shared by the end-to-end and predict tests."""
    output_dir = tmp_path_factory.mktemp("trained")
    result = train_tiny(output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


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
