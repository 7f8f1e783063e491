"""bench.precision on a small labelled data set: the report's lines, and numbers that hold exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.precision import main
from model.package import load_package
from model.preprocess import decode_image, pad_tokens, tokenize
from tests.conftest import TEST_LABELS, png_bytes


def test_precision_report_compares_answers_accuracy_and_speed(
    tiny_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    colors = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (235, 200, 30)]
    for index, color in enumerate(colors):
        (tmp_path / "images" / f"{index}.png").write_bytes(png_bytes(color=color))
        rows.append({"image": f"images/{index}.png", "text": f"question {index}?", "label": TEST_LABELS[index]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    # What the model itself answers, at full precision, without the engine.
    package = load_package(tiny_package)
    images = torch.from_numpy(np.stack([decode_image(png_bytes(color=c), package.manifest.image_size) for c in colors]))
    tokens = torch.from_numpy(pad_tokens([tokenize(row["text"], package.manifest.max_text_length).ids for row in rows]))
    with torch.inference_mode():
        picked = package.module(images, tokens)["logits"].argmax(dim=1).tolist()
    correct = sum(TEST_LABELS[p] == row["label"] for p, row in zip(picked, rows, strict=True))

    assert main(["--model", str(tiny_package), "--data", str(data), "--batch-sizes", "1,4", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tiny_package} on cpu, 1 thread(s), 4 rows of {data}"
    changed = int(lines[1].removeprefix("answers changed by bf16: ").split(" of ")[0])
    assert lines[1] == f"answers changed by bf16: {changed} of 4 ({25 * changed:.2f}%)"
    assert lines[2] == f"accuracy at fp32: {25 * correct:.2f}%"
    assert lines[3].startswith("accuracy at bf16: ")
    assert 0 < float(lines[4].removeprefix("largest embedding difference: ")) < 2e-2
    assert lines[5:8] == ["", "| batch | fp32 ms | bf16 ms | speed-up |", "|---|---|---|---|"]
    assert [line.split(" | ")[0] for line in lines[8:]] == ["| 1", "| 4"]
