"""read_jsonl: DESIGN.md's record format, and labels written as text or as indices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data import DatasetError, read_jsonl
from trainer.shapesqa_scene import LABELS


def write(path: Path, labels: list[object]) -> Path:
    path.write_text(
        "".join(json.dumps({"img": f"{i}.png", "text": "q", "label": v}) + "\n" for i, v in enumerate(labels))
    )
    return path


def test_text_labels_and_indices_each_read_as_they_say(tmp_path: Path) -> None:
    assert [r.label for r in read_jsonl(write(tmp_path / "text.jsonl", ["yes", "3", "square", "0"]), LABELS)] == [
        0,
        18,
        3,
        15,
    ]
    # Integers alone are indices, whatever the labels look like: 3 is "square", 18 is "3".
    assert [r.label for r in read_jsonl(write(tmp_path / "index.jsonl", [0, 3, 18]), LABELS)] == [0, 3, 18]
    assert read_jsonl(write(tmp_path / "i.jsonl", ["yes"]), LABELS)[0].image == str((tmp_path / "0.png").resolve())


def test_an_integer_in_a_file_of_text_labels_that_is_also_a_label_is_refused(tmp_path: Path) -> None:
    """ShapesQA's count answers are the labels "0" to "6"; a file that writes `"label": 3` among text
    labels means "3", and read as index 3 it would train or score against "square" without a word."""
    path = write(tmp_path / "mixed.jsonl", ["yes", "red", 3, "left"])
    with pytest.raises(DatasetError) as refused:
        read_jsonl(path, LABELS)
    assert str(refused.value) == (
        f"{path}:3: label 3 is an integer in a file of text labels: as an index it is 'square', but '3' is a"
        " label too; write it as a string, or every label as an index"
    )


def test_an_integer_among_text_labels_that_names_no_other_label_is_an_index(tmp_path: Path) -> None:
    """DESIGN.md allows either form in one file: where an integer can only be an index, it is one."""
    records = read_jsonl(write(tmp_path / "mixed.jsonl", ["benign", 1]), ("benign", "hateful"))
    assert [r.label for r in records] == [0, 1]
    # Labels that are their own indices: 2 reads the same either way.
    labels = tuple(str(i) for i in range(4))
    assert [r.label for r in read_jsonl(write(tmp_path / "digits.jsonl", ["1", 2]), labels)] == [1, 2]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (22, "label index 22 is outside 0..21"),
        (True, "label must be a string or an integer, not True"),
        ("maybe", "label 'maybe' is not one of the 22 labels"),
    ],
)
def test_a_label_that_names_nothing_is_refused_with_its_line(tmp_path: Path, label: object, message: str) -> None:
    path = write(tmp_path / "bad.jsonl", ["yes", label])
    with pytest.raises(DatasetError) as refused:
        read_jsonl(path, LABELS)
    assert str(refused.value) == f"{path}:2: {message}"
