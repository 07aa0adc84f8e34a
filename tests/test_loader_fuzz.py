"""Bring-your-own data, fuzzed: whatever file a participant brings ends in a dataset or in one clear line.

Property-based (hypothesis) over random bytes, encodings, missing and extra columns, empty texts, numeric, mixed and
odd labels, and huge rows. A case passes when ``load_task`` returns a usable two-or-more-label task or raises a
one-line ConfigError, within a bounded time; any other exception (a traceback for the participant) fails it.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpft_lab.data import TaskData, load_task
from fedpft_lab.errors import ConfigError

FUZZ = settings(max_examples=60, deadline=5000, derandomize=True,  # derandomized: the same cases on every run
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def load_file(content: bytes, suffix: str) -> TaskData | ConfigError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"mine{suffix}"
        path.write_bytes(content)
        try:
            return load_task(str(path), max_train=64, max_test=32)
        except ConfigError as err:
            return err


def assert_dataset_or_one_line(result: TaskData | ConfigError) -> None:
    if isinstance(result, ConfigError):
        msg = str(result)
        assert msg and "\n" not in msg and len(msg) < 600, msg
        return
    assert result.num_labels >= 2 and len(result.train) > 0 and len(result.test) > 0
    for split in (result.train, result.test):
        assert all(0 <= y < result.num_labels for y in split["label"])
        assert all(isinstance(t, str) and t.strip() == t and t for t in split["text"])
    assert len(set(result.train["label"])) >= 2


@FUZZ
@given(content=st.binary(max_size=3000), suffix=st.sampled_from([".csv", ".jsonl"]))
def test_random_bytes(content, suffix):
    assert_dataset_or_one_line(load_file(content, suffix))


# Cells as they turn up in real exports: words, numbers, missing values, odd floats, lone surrogates, nesting.
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=30)
CELL = st.one_of(ANY_TEXT, st.integers(-3, 3), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                 st.booleans(), st.none(), st.just(""), st.just("   "), st.lists(st.integers(0, 2), max_size=2))
COLUMNS = st.one_of(st.just(["text", "label"]), st.just(["label", "text", "extra"]),
                    st.just(["text", "text_pair", "label"]),
                    st.lists(st.sampled_from(["text", "label", "text_pair", "extra", "Text", "label "]),
                             max_size=4, unique=True))


@st.composite
def tables(draw) -> tuple[list[str], list[dict]]:
    """Mostly well-formed tables (so that loading succeeds often) with odd cells, labels and sizes mixed in."""
    columns = draw(COLUMNS)
    pool = draw(st.lists(st.one_of(st.integers(0, 2), st.sampled_from(["pos", "neg", " pos ", "1", "1.0"]), CELL),
                         min_size=1, max_size=4))
    label = st.one_of(st.sampled_from(pool), CELL)
    text = st.one_of(st.text(min_size=1, max_size=30), CELL)
    n = draw(st.integers(0, 60))
    rows = [{c: draw(label if c.startswith("label") else text) for c in columns} for _ in range(n)]
    huge = draw(st.sampled_from([0, 0, 0, 200_000, 2_000_000]))
    if rows and huge and "text" in columns:
        rows[0]["text"] = "word " * (huge // 5)
    return columns, rows


def encode(text: str, encoding: str) -> bytes:
    if encoding == "utf-8":
        return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8 bytes
    return text.encode(encoding, "replace")


@FUZZ
@given(table=tables(), suffix=st.sampled_from([".csv", ".jsonl"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
def test_random_tables(table, suffix, encoding):
    columns, rows = table
    if suffix == ".csv":
        text = pd.DataFrame(rows, columns=columns).to_csv(index=False)
    else:
        text = "".join(json.dumps(r, default=str, allow_nan=True) + "\n" for r in rows)
    assert_dataset_or_one_line(load_file(encode(text, encoding), suffix))


# ----------------------------------------------------------------------------- the cases fuzzing found

def write(tmp_path: Path, name: str, content: bytes) -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


def frame_csv(n: int = 20, labels=("a", "b")) -> str:
    return pd.DataFrame({"text": [f"text {i}" for i in range(n)],
                         "label": [labels[i % len(labels)] for i in range(n)]}).to_csv(index=False)


def test_a_single_label_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"single label \('spam'\).*at least 2 different labels"):
        load_task(write(tmp_path, "one.csv", frame_csv(labels=("spam",)).encode()))
    with pytest.raises(ConfigError, match="single label"):  # two labels in the file, one left after max_train
        load_task(write(tmp_path, "two.csv", frame_csv(labels=("a", "b")).encode()), max_train=1)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_excel_and_utf16_exports_load(tmp_path, encoding):
    task = load_task(write(tmp_path, "excel.csv", frame_csv().replace("text 0", "café").encode(encoding)))
    assert task.label_names == ["a", "b"] and "café" in set(task.train["text"]) | set(task.test["text"])


def test_errors_quoting_columns_or_values_stay_short(tmp_path):
    header = ",".join(f"column_with_a_long_name_{i}" for i in range(200))
    with pytest.raises(ConfigError) as err:
        load_task(write(tmp_path, "wide.csv", (header + "\n" + ",".join("1" * 200) + "\n").encode()))
    assert len(str(err.value)) < 400 and "missing the column 'text'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_task("x" * 5000 + ".csv")
    assert len(str(err.value)) < 400
    long_label = "L" * 10_000
    with pytest.raises(ConfigError) as err:
        load_task(write(tmp_path, "long.csv", frame_csv(labels=(long_label,)).encode()))
    assert len(str(err.value)) < 400


def test_odd_labels_load_as_text_and_lone_surrogates_are_replaced(tmp_path):
    rows = [{"text": f"t{i} \ud800", "label": [math.inf, 1e300, 2, "x"][i % 4]} for i in range(40)]
    path = write(tmp_path, "odd.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    task = load_task(path)
    assert task.label_names == ["1e+300", "2", "inf", "x"]  # not all whole numbers: labels by their text
    assert all("\ud800" not in t for t in task.train["text"])
    assert np.isin(task.train["label"], range(4)).all()
    numeric = [{"text": f"t{i}", "label": [math.inf, 1, 2][i % 3]} for i in range(30)]  # inf is no class number
    task = load_task(write(tmp_path, "inf.jsonl", "".join(json.dumps(r) + "\n" for r in numeric).encode()))
    assert task.label_names == ["1", "2", "inf"]
