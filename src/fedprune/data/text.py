"""Text corpora for perplexity and calibration: WikiText-2, PTB, C4 sample, any text file.

Each loader returns one string, joined the way the pruning literature joins it, so that
perplexity figures are comparable:

- ``wikitext2``: the Hugging Face ``wikitext-2-raw-v1`` test rows joined with ``"\\n\\n"``
  (GPTQ / SparseGPT / Wanda / SliceGPT). Read from ``derived/wikitext-2-raw-v1.test.rows.json``
  (the exact 4358 HF rows) or else recovered from ``test.txt`` (= ``"\\n".join(rows)``).
- ``ptb``: Penn Treebank test sentences (``ptb_text_only``, one stripped line each) joined
  with ``" "`` (GPTQ's ``ptb-new`` convention).
- ``c4``: the C4 sample's documents (``prefix + gold_completion``) joined with ``"\\n\\n"``.
- ``text:PATH``: the file's text as it is.

The ``-train`` / ``-valid`` corpora exist for calibration, which must not overlap the test text.
"""
from __future__ import annotations

import os
from pathlib import Path

from .catalog import DatasetSpec, get_dataset, local_or_hub, register, resolve_root
from .files import read_json, read_jsonl, read_text

WIKITEXT_ROWS = "wikitext-2-raw/derived/wikitext-2-raw-v1.test.rows.json"
WIKITEXT_JOINED = "wikitext-2-raw/test.txt"
WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")


def rows_from_newline_joined(text: str) -> list[str]:
    """Invert ``"\\n".join(rows)`` for WikiText rows (each row is ``""`` or ends in one ``"\\n"``)."""
    pieces = text.split("\n")
    rows: list[str] = []
    i = 0
    while i < len(pieces):
        if pieces[i]:
            rows.append(pieces[i] + "\n")
            i += 2  # skip the empty piece between the row's own newline and the separator
        else:
            rows.append("")
            i += 1
    return rows


def _read_wikitext_test(root: Path) -> str:
    if (root / WIKITEXT_ROWS).is_file():
        rows = read_json(root / WIKITEXT_ROWS)["text"]
        return "\n\n".join(rows)
    return local_or_hub(
        root, (WIKITEXT_JOINED,),
        lambda p: "\n\n".join(rows_from_newline_joined(read_text(p))),
        (*WIKITEXT_HUB, "test"), lambda ds: "\n\n".join(ds["text"]),
    )


def _read_wikitext_train(root: Path) -> str:
    # The raw train file is not in the shared data (too large for the snapshot service).
    return local_or_hub(root, ("wikitext-2-raw/wiki.train.raw",), read_text,
                        (*WIKITEXT_HUB, "train"), lambda ds: "\n\n".join(ds["text"]))


def _read_wikitext_valid(root: Path) -> str:
    # pytorch/examples' tokenized validation split (rare words as <unk>); the raw one is not local.
    return local_or_hub(root, ("wikitext-2-tokenized/valid.txt",), read_text,
                        (*WIKITEXT_HUB, "validation"), lambda ds: "\n\n".join(ds["text"]))


def _ptb_reader(split: str, relpath: str):
    def read(root: Path) -> str:
        return local_or_hub(
            root, (relpath,),
            lambda p: " ".join(line.strip() for line in read_text(p).splitlines()),
            ("ptb_text_only", "penn_treebank", split), lambda ds: " ".join(ds["sentence"]),
        )
    return read


def c4_documents(root: Path) -> list[str]:
    """The C4 sample's documents, in file order (``prefix + gold_completion`` each)."""
    def local(p: Path) -> list[str]:
        return [rec["prefix"] + rec["gold_completion"] for rec in read_jsonl(p)]

    return local_or_hub(root, ("c4-sample/c4.jsonl",), local, ("allenai/c4", None, "validation"),
                        lambda ds: list(ds.select(range(min(len(ds), 5000)))["text"]),
                        hub_kwargs={"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}})


def _read_c4(root: Path) -> str:
    return "\n\n".join(c4_documents(root))


for _spec in (
    DatasetSpec("wikitext2", "text", _read_wikitext_test, "WikiText-2 raw test rows joined with \\n\\n", "ppl"),
    DatasetSpec("wikitext2-train", "text", _read_wikitext_train, "WikiText-2 raw train (calibration)", "ppl"),
    DatasetSpec("wikitext2-valid", "text", _read_wikitext_valid,
                "WikiText-2 validation (local copy is the tokenized form with <unk>; calibration)", "ppl"),
    DatasetSpec("ptb", "text", _ptb_reader("test", "ptb/ptb.test.txt"), "PTB test sentences joined with ' '", "ppl"),
    DatasetSpec("ptb-valid", "text", _ptb_reader("validation", "ptb/ptb.valid.txt"), "PTB validation", "ppl"),
    DatasetSpec("c4", "text", _read_c4, "C4 sample documents joined with \\n\\n", "ppl"),
):
    register(_spec)


def is_text_dataset(name: str) -> bool:
    """True for registered text corpora and for ``text:PATH``."""
    if name.startswith("text:"):
        return True
    from .catalog import DATASETS

    return name in DATASETS and DATASETS.get(name).kind == "text"


def text_file(name: str) -> Path:
    """The file of a ``text:PATH`` spec; a missing one raises, naming it (checked before a model loads)."""
    path = Path(name[len("text:"):]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path} (from dataset spec {name!r})")
    return path


def load_text(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The text of corpus ``name`` (a registered text dataset or ``text:PATH``)."""
    if name.startswith("text:"):
        return read_text(text_file(name))
    spec = get_dataset(name)
    if spec.kind != "text":
        raise ValueError(f"dataset {name!r} is a {spec.kind} dataset, not a text corpus")
    return spec.load(resolve_root(data_dir))
