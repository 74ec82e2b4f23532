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


def test_the_script_reads_in_one_direction():
    """Each function or class uses only the functions, classes and constants defined above it, so a reader can
    follow a run from main() upwards without jumping down and back."""
    import ast

    tree = ast.parse((ROOT / "sentiment_analysis.py").read_text())
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = node.lineno
        elif isinstance(node, ast.Assign):
            defined.update({target.id: node.lineno for target in node.targets if isinstance(target, ast.Name)})
    backwards = sorted({f"{node.name} uses {name.id}" for node in tree.body
                        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                        for name in ast.walk(node)
                        if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load)
                        and defined.get(name.id, 0) > node.lineno})
    assert backwards == []


def test_the_stages_hand_each_other_typed_objects():
    import dataclasses

    import sentiment_analysis as sa

    for name in ("LabelledTexts", "LoadedData", "DataSplits", "PreparedInputs", "TrainingState", "TrainingResult",
                 "ClusterRole", "RunSetup", "Evaluation", "Blend", "Run", "Scored", "InputsCache", "PlanAsked",
                 "Architecture"):
        assert dataclasses.is_dataclass(getattr(sa, name)), name
