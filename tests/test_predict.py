"""The predict subcommand on the model saved by the tiny training run: every mode and every error path.

In-process (main([...])) except where the process itself is the promise."""

import pandas as pd
import pytest

import sentiment_analysis as sa
from conftest import TINY_CSV, assert_user_error, run_main, run_script

TEXTS = ["An absolute delight, the best film of the year!", "Dull, slow and badly acted. Avoid.",
         "It was fine."]


def parse_lines(stdout):
    rows = [line.split("\t") for line in stdout.splitlines() if line.strip()]
    assert all(len(row) == 3 for row in rows), stdout
    return rows


def check_rows(rows, texts, threshold=0.5):
    assert len(rows) == len(texts)
    for (label, probability, shown), text in zip(rows, texts):
        assert len(probability.split(".")[1]) == 4
        assert 0.0 <= float(probability) <= 1.0
        assert label == ("positive" if float(probability) >= threshold else "negative")
        assert text.startswith(shown.rstrip(".")[:20])


@pytest.mark.slow
def test_predict_texts_in_order(trained_dir):
    result = run_main("predict", "--model", trained_dir / "model.keras", *TEXTS)
    assert result.returncode == 0, result.stderr[-3000:]
    check_rows(parse_lines(result.stdout), TEXTS)


@pytest.mark.slow
def test_predict_long_text_is_shown_on_one_short_line(trained_dir):
    long_text = "Great acting.\nGreat story. " * 40
    result = run_main("predict", "--model", trained_dir / "model.keras", long_text)
    assert result.returncode == 0, result.stderr[-3000:]
    (label, probability, shown), = parse_lines(result.stdout)
    assert len(shown) <= 80 and shown.endswith("...") and "\n" not in shown


@pytest.mark.slow
def test_predict_from_stdin_matches_arguments(trained_dir):
    model = trained_dir / "model.keras"
    from_stdin = run_main("predict", "--model", model, "-", stdin="\n".join(TEXTS) + "\n\n")
    from_args = run_main("predict", "--model", model, *TEXTS)
    assert from_stdin.returncode == 0, from_stdin.stderr[-3000:]
    assert from_stdin.stdout == from_args.stdout


@pytest.mark.slow
def test_threshold_decides_the_label(trained_dir):
    model = trained_dir / "model.keras"
    texts = pd.read_csv(TINY_CSV)["reviews"].head(20).tolist()
    probabilities = sorted(float(row[1]) for row in parse_lines(run_main("predict", "--model", model,
                                                                             *texts).stdout))
    # A threshold between two of the probabilities, as far in the sorted list from where the default threshold
    # splits it as it can be: some texts fall on each side of it, and a different number than at the default.
    at_default = sum(probability < sa.DECISION_THRESHOLD for probability in probabilities)
    gaps = [index for index in range(1, len(probabilities)) if probabilities[index - 1] < probabilities[index]]
    middle = max(gaps, key=lambda index: abs(index - at_default))
    assert middle != at_default, probabilities
    threshold = round((probabilities[middle - 1] + probabilities[middle]) / 2, 6)
    assert probabilities[middle - 1] < threshold < probabilities[middle], probabilities
    rows = parse_lines(run_main("predict", "--model", model, "--threshold", str(threshold), *texts).stdout)
    check_rows(rows, texts, threshold=threshold)
    labels = [row[0] for row in rows]
    assert labels.count("positive") == len(texts) - middle and labels.count("negative") == middle
    default_labels = [row[0] for row in parse_lines(run_main("predict", "--model", model, *texts).stdout)]
    assert default_labels.count("negative") == at_default != labels.count("negative")  # --threshold was used


@pytest.mark.slow
def test_predict_csv_keeps_columns_order_and_empty_rows(trained_dir, tmp_path):
    source = pd.read_csv(TINY_CSV).head(30)
    source.insert(0, "id", range(100, 130))
    source.loc[[3, 17], "reviews"] = ["", "   "]
    input_path, output_path = tmp_path / "in.csv", tmp_path / "out.csv"
    source.to_csv(input_path, index=False)
    result = run_main("predict", "--model", trained_dir / "model.keras", "--input", input_path,
                        "--output", output_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pd.read_csv(output_path, keep_default_na=False)
    assert list(scored.columns) == ["id", "reviews", "sentiment", "predicted_sentiment", "probability_positive"]
    assert scored["id"].tolist() == list(range(100, 130))
    empty = scored.loc[[3, 17]]
    assert (empty["predicted_sentiment"] == "").all() and (empty["probability_positive"] == "").all()
    rest = scored.drop(index=[3, 17])
    assert set(rest["predicted_sentiment"]) <= {"positive", "negative"}
    probabilities = rest["probability_positive"].astype(float)
    assert probabilities.between(0, 1).all()
    assert ((probabilities >= 0.5) == (rest["predicted_sentiment"] == "positive")).all()
    # The CSV path and the text path give the same probabilities for the same reviews.
    direct = run_main("predict", "--model", trained_dir / "model.keras", *rest["reviews"].head(3))
    assert [row[1] for row in parse_lines(direct.stdout)] == [f"{p:.4f}" for p in probabilities.head(3)]


@pytest.mark.slow
def test_predict_csv_with_rows_wider_than_its_header_is_one_line(trained_dir, tmp_path):
    input_path, output_path = tmp_path / "in.csv", tmp_path / "out.csv"
    input_path.write_text("reviews\nhello, world\ngreat, film\n")
    result = run_main("predict", "--model", trained_dir / "model.keras", "--input", input_path,
                      "--output", output_path)
    assert_user_error(result, "more fields than its header")
    assert not output_path.exists()


@pytest.mark.slow
def test_predict_csv_with_named_text_column(trained_dir, tmp_path):
    source = pd.read_csv(TINY_CSV).head(5).rename(columns={"reviews": "body"})
    input_path, output_path = tmp_path / "in.csv", tmp_path / "out.csv"
    source.to_csv(input_path, index=False)
    missing = run_main("predict", "--model", trained_dir / "model.keras", "--input", input_path,
                         "--output", output_path)
    assert_user_error(missing, "'body'")
    assert not output_path.exists()
    result = run_main("predict", "--model", trained_dir / "model.keras", "--input", input_path,
                        "--output", output_path, "--text-column", "body")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(pd.read_csv(output_path)) == 5


@pytest.mark.slow
def test_predict_error_paths(trained_dir, tmp_path):
    model = trained_dir / "model.keras"
    assert_user_error(run_main("predict", "--model", tmp_path / "missing.keras", "hello"), "not found")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip file")
    assert_user_error(run_main("predict", "--model", broken, "hello"), "could not load")
    assert_user_error(run_main("predict", "--model", model), "nothing to predict")
    assert_user_error(run_main("predict", "--model", model, "--threshold", "1.5", "x"), "--threshold")
    assert_user_error(run_main("predict", "--model", model, "--input", TINY_CSV), "--output")
    assert_user_error(run_main("predict", "--model", model, "--input", tmp_path / "no.csv",
                                 "--output", tmp_path / "o.csv"), "not found")
    malformed = tmp_path / "malformed.txt"
    malformed.write_text("reviews\n" + "fine review\n" * 10 + '"never closed quote\n')
    assert_user_error(run_main("predict", "--model", model, "--input", malformed,
                                 "--output", tmp_path / "o.csv"), "could not parse")
    for output in (tmp_path, tmp_path / "missing_dir" / "out.csv"):
        assert_user_error(run_main("predict", "--model", model, "--input", TINY_CSV, "--output", output))
    assert list(tmp_path.glob("*.csv")) == []


def test_predict_help():
    result = run_main("predict", "--help")
    assert result.returncode == 0 and "--input" in result.stdout and "--threshold" in result.stdout


@pytest.mark.slow
def test_predict_with_a_missing_model_in_a_subprocess_is_one_line(tmp_path):
    assert_user_error(run_script("predict", "--model", tmp_path / "missing.keras", "hello"), "not found")


@pytest.mark.slow
def test_predict_csv_in_latin1_is_read_with_a_warning(trained_dir, tmp_path):
    source = pd.read_csv(TINY_CSV).head(5)
    source.loc[4, "reviews"] = "Un film très réussi, vraiment"  # The only non-ASCII text, in the last row.
    input_path, output_path = tmp_path / "latin1.csv", tmp_path / "scored.csv"
    source.to_csv(input_path, index=False, encoding="latin-1")
    result = run_main("predict", "--model", trained_dir / "model.keras", "--input", input_path,
                        "--output", output_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not valid UTF-8; reading it as Latin-1" in result.stderr
    scored = pd.read_csv(output_path)
    assert scored["reviews"].tolist() == source["reviews"].tolist()
    assert scored["predicted_sentiment"].isin(["positive", "negative"]).all()


@pytest.mark.slow
def test_empty_texts_get_no_prediction_in_every_mode(trained_dir, tmp_path):
    model = trained_dir / "model.keras"
    # Arguments: the empty and the blank text are said to have no prediction; the others are predicted in order.
    result = run_main("predict", "--model", model, TEXTS[0], "", "   ", TEXTS[1])
    assert result.returncode == 0, result.stderr[-3000:]
    check_rows(parse_lines(result.stdout), [TEXTS[0], TEXTS[1]])
    assert "no prediction for empty texts 2, 3" in result.stderr
    # Standard input skips blank lines the same way, and every text empty is a mistake in either mode.
    from_stdin = run_main("predict", "--model", model, "-", stdin=f"{TEXTS[0]}\n   \n\n{TEXTS[1]}\n")
    assert from_stdin.returncode == 0 and from_stdin.stdout == result.stdout
    assert_user_error(run_main("predict", "--model", model, "", " "), "every text given is empty")
    assert_user_error(run_main("predict", "--model", model, "-", stdin="\n  \n"), "every text given is empty")
    # A CSV: the empty rows stay, without a prediction (and a CSV of only empty texts is written the same way).
    pd.DataFrame({"id": [1, 2], "reviews": ["", "  "]}).to_csv(tmp_path / "empty.csv", index=False)
    result = run_main("predict", "--model", model, "--input", tmp_path / "empty.csv", "--output", tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert len(scored) == 2 and (scored["predicted_sentiment"] == "").all()
