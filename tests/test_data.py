"""The dataset registry and loaders, on the real files of the data directory (skipped without it)."""
from __future__ import annotations

import json

import pytest
import torch

from fedprune import data
from fedprune.data import catalog
from fedprune.data.calibration import random_windows
from fedprune.data.choice import parse_openbookqa_choices, parse_winogrande_instruction
from fedprune.data.text import rows_from_newline_joined
from fedprune.data.toy_tokenizer import toy_tokenizer

ROOT = data.resolve_root()
needs_data = pytest.mark.skipif(not (ROOT / "piqa" / "dev.jsonl").is_file(),
                                reason=f"local data not found under {ROOT} (set $FEDPRUNE_DATA)")

# rows per SOURCES.md of the data directory
TASK_ROWS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
             "arc_challenge": 1172, "openbookqa": 500, "siqa": 1954}


def test_registry_knows_every_dataset_and_refuses_unknown_names():
    for name in (*TASK_ROWS, "wikitext2", "ptb", "c4", "dolly"):
        assert name in data.DATASETS
    assert set(data.SEVEN_TASKS) == {t for t in TASK_ROWS if data.get_dataset(t).in_average}
    with pytest.raises(KeyError, match="known: .*piqa"):
        data.get_dataset("piqaa")
    with pytest.raises(ValueError, match="already registered"):
        catalog.register(data.get_dataset("piqa"))


@needs_data
@pytest.mark.parametrize("task", sorted(TASK_ROWS))
def test_task_files_parse_with_labels_in_range(task):
    examples = data.load_examples(task)  # ChoiceExample checks label range and request count
    assert len(examples) == TASK_ROWS[task]
    assert all(len(ex.choices) >= 2 for ex in examples)
    assert len(data.load_examples(task, limit=5)) == 5


@needs_data
def test_first_examples_match_the_files():
    piqa = data.load_examples("piqa", limit=1)[0]
    assert piqa.requests[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                                " Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
                                "paper strips, you will also need to supply it with a water bottle and a food dish.")
    assert piqa.label == 0
    wino = data.load_examples("winogrande", limit=1)[0]
    assert wino.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert wino.label == 1
    hella = data.load_examples("hellaswag", limit=1)[0]
    assert hella.requests[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                                 " starts pulling up roofing on a roof.")
    assert hella.label == 3
    boolq = data.load_examples("boolq", limit=1)[0]
    assert boolq.choices == ("no", "yes") and boolq.label == 0
    assert boolq.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    arc = data.load_examples("arc_easy", limit=1)[0]
    assert arc.label == 0 and len(arc.choices) == 4
    obqa = data.load_examples("openbookqa", limit=1)[0]
    assert obqa.choices == ("make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                            "have lunch with friends")
    assert obqa.label == 1 and not obqa.requests[0][0].endswith(" ")


@needs_data
def test_wikitext2_is_the_hf_rows_joined_with_blank_lines():
    rows = json.loads((ROOT / "wikitext-2-raw/derived/wikitext-2-raw-v1.test.rows.json").read_text())["text"]
    assert len(rows) == 4358
    assert rows_from_newline_joined((ROOT / "wikitext-2-raw/test.txt").read_text(encoding="utf-8")) == rows
    text = data.load_text("wikitext2")
    assert text == "\n\n".join(rows) and text.startswith("\n\n = Robert Boulter = \n")


def test_rows_from_newline_joined_inverts_the_join():
    rows = ["", " = A = \n", "", "", " b c \n", " d \n", ""]
    assert rows_from_newline_joined("\n".join(rows)) == rows


@needs_data
def test_ptb_c4_and_dolly():
    assert data.load_text("ptb").startswith("no it was n't black monday but while")
    assert data.load_text("c4").count("\n\n") >= 1479
    sizes = [len(data.dolly_client(i)) for i in range(10)]
    assert sizes == [1493, 1493, 1493, 1492, 1493, 1493, 1493, 1493, 1494, 1494]
    test = data.dolly_global_test()
    assert len(test) == 80 and set(test[0]) == {"instruction", "context", "response", "category"}
    with pytest.raises(ValueError):
        data.dolly_client(10)


def test_missing_file_error_names_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(catalog, "load_hub", offline)
    with pytest.raises(FileNotFoundError) as err:
        data.load_examples("piqa", data_dir=tmp_path)
    assert str(tmp_path / "piqa" / "dev.jsonl") in str(err.value) and "baber/piqa" in str(err.value)
    with pytest.raises(FileNotFoundError, match="local_training_3.json"):
        data.dolly_client(3, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="wikitext-2-raw/test.txt"):
        data.load_text("wikitext2", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        data.load_text(f"text:{tmp_path / 'nothing.txt'}")


def test_parsers_of_the_llm_adapters_and_tsv_formats():
    inst = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
            "Ian ate the _ because it was fresh.\n\nOption1: apple Option2: stone Answer format: option1/option2")
    assert parse_winogrande_instruction(inst) == {"sentence": "Ian ate the _ because it was fresh.",
                                                  "option1": "apple", "option2": "stone"}
    with pytest.raises(ValueError):
        parse_winogrande_instruction("something else")
    assert parse_openbookqa_choices("(A) a marsh (B) a tundra (C) the plains (D) a desert") == {
        "text": ["a marsh", "a tundra", "the plains", "a desert"], "label": ["A", "B", "C", "D"]}


@needs_data
def test_calibration_samples_are_seeded_windows_of_a_non_test_corpus():
    tok = toy_tokenizer()
    a = data.calibration_samples(tok, "c4", nsamples=4, seq_len=32, seed=0)
    assert a.shape == (4, 32) and a.dtype == torch.long
    tokens = torch.arange(1000)
    w0, w0b, w1 = (random_windows(tokens, 4, 32, seed) for seed in (0, 0, 1))
    assert torch.equal(w0, w0b) and not torch.equal(w0, w1)
    assert torch.equal(w0 - w0[:, :1], torch.arange(32).expand(4, 32))  # contiguous windows
    assert data.calibration_corpus("wikitext2") in ("wikitext2-train", "wikitext2-valid")
    assert data.calibration_corpus("ptb") == "ptb-valid"
    with pytest.raises(ValueError, match="fewer than seq_len"):
        random_windows(tokens, 1, 2000)
