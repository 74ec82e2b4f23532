"""The repository's promises: CI runs the README's test command, and the dataset is the shipped one."""

import re

import pandas as pd

from conftest import ROOT


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^(pip install -r requirements\.txt.*)$", text, flags=re.MULTILINE)


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    test_commands = [command for command in commands if "pytest" in command]
    assert len(test_commands) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0] in ci_lines


def test_readme_main_command_runs_the_script():
    assert any(command.endswith("python sentiment_analysis.py") for command in readme_commands())


def test_shipped_dataset_has_the_documented_shape():
    frame = pd.read_csv(ROOT / "imdb.csv")
    assert list(frame.columns) == ["reviews", "sentiment"]
    assert len(frame) == 49992
    assert frame["sentiment"].value_counts().to_dict() == {"negative": 24998, "positive": 24994}
