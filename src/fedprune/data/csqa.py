"""CommonsenseQA: two zero-shot tasks over the validation split, and the labelled training split.

Files: ``csqa/train.jsonl`` (9,741 questions) and ``csqa/valid.jsonl`` (1,221), one record per
line with ``answerKey``, ``question.stem``, ``question.choices[{label, text}]`` and
``question.question_concept``; when missing, the public ``tau/commonsense_qa`` (same
validation split as lm-eval's task). Records are turned into the Hugging Face shape
(``question``, ``question_concept``, ``choices: {label, text}``, ``answerKey``) so that a local
record and a downloaded one go through the same builders.

Two tasks:

| task | context | choices | reported |
|---|---|---|---|
| commonsense_qa | ``Question: {stem}\\nA. {a}\\n...\\nE. {e}\\nAnswer:`` | `` A`` ... `` E`` | acc |
| commonsense_qa_cloze | ``Question: {stem}\\nAnswer:`` | `` {text}`` x5 | acc_norm |

``commonsense_qa`` is lm-eval 0.4's own task (``lm_eval/tasks/commonsense_qa/default.yaml``):
the letters are scored, which needs a model that can read a lettered list; a 135M model is
near chance there (0.2). ``commonsense_qa_cloze`` scores the answer texts themselves, as ARC
is scored, so a small model's knowledge shows, and it is exactly what a federated run on the
training split trains (``fedprune.federated.partition``: context = this prompt, response = the
right choice's text). It reports ``acc_norm``: the five answers differ widely in length
("bank" vs "department store"), and the summed log-likelihood favours short answers for
reasons that have nothing to do with the question; dividing by the length in characters
removes most of that bias (the same reason lm-eval reports acc_norm for ARC-Challenge and
OpenBookQA, whose answers are as uneven). ``acc`` is computed and logged too.
"""
from __future__ import annotations

import os
from pathlib import Path

from .catalog import DatasetSpec, local_or_hub, register, resolve_root
from .choice import ChoiceExample, multiple_choice
from .files import read_jsonl

LETTERS = ("A", "B", "C", "D", "E")
TRAIN_FILE = "csqa/train.jsonl"
VALID_FILE = "csqa/valid.jsonl"
HUB = "tau/commonsense_qa"


def hf_record(raw: dict) -> dict:
    """A local CommonsenseQA line -> the Hugging Face record (question, question_concept, choices, answerKey)."""
    q = raw["question"]
    if isinstance(q, str):  # already HF-shaped
        return raw
    return {"id": raw.get("id", ""), "question": q["stem"], "question_concept": q.get("question_concept", ""),
            "choices": {"label": [c["label"] for c in q["choices"]], "text": [c["text"] for c in q["choices"]]},
            "answerKey": raw["answerKey"]}


def _hub_records(ds) -> list[dict]:
    return [{"id": r["id"], "question": r["question"], "question_concept": r["question_concept"],
             "choices": {"label": list(r["choices"]["label"]), "text": list(r["choices"]["text"])},
             "answerKey": r["answerKey"]} for r in ds]


def _local(path: Path) -> list[dict]:
    out = []
    for i, raw in enumerate(read_jsonl(path), start=1):
        try:
            rec = hf_record(raw)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed CommonsenseQA record at {path}, line {i}: missing {exc}") from None
        if rec["answerKey"] not in rec["choices"]["label"]:
            raise ValueError(f"{path}, line {i}: answerKey {rec['answerKey']!r} is not one of the choice labels "
                             f"{rec['choices']['label']}")
        out.append(rec)
    return out


def read_csqa_valid(root: Path) -> list[dict]:
    """The 1,221 validation questions (lm-eval's ``commonsense_qa`` evaluation split)."""
    return local_or_hub(root, (VALID_FILE,), _local, (HUB, None, "validation"), _hub_records)


def read_csqa_train(root: Path) -> list[dict]:
    """The 9,741 labelled training questions (federated fine-tuning)."""
    return local_or_hub(root, (TRAIN_FILE,), _local, (HUB, None, "train"), _hub_records)


def csqa_train(data_dir: str | os.PathLike | None = None) -> list[dict]:
    return read_csqa_train(resolve_root(data_dir))


def csqa_valid(data_dir: str | os.PathLike | None = None) -> list[dict]:
    return read_csqa_valid(resolve_root(data_dir))


def answer_index(doc: dict) -> int:
    return list(doc["choices"]["label"]).index(doc["answerKey"])


def cloze_prompt(doc: dict) -> str:
    """``Question: {stem}\\nAnswer:`` (ARC's prompt); the answer text follows after a space."""
    return f"Question: {doc['question']}\nAnswer:"


def csqa_letter_example(doc: dict) -> ChoiceExample:
    """lm-eval's ``commonsense_qa``: the five choices listed with letters, the letter scored."""
    texts = doc["choices"]["text"]
    listed = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, texts))
    return multiple_choice(f"Question: {doc['question'].strip()}{listed}\nAnswer:", list(LETTERS), answer_index(doc))


def csqa_cloze_example(doc: dict) -> ChoiceExample:
    """Each answer text scored after the question (``" {text}"``)."""
    return multiple_choice(cloze_prompt(doc), list(doc["choices"]["text"]), answer_index(doc))


register(DatasetSpec("commonsense_qa", "choice", read_csqa_valid,
                     "CommonsenseQA validation, lettered choices (lm-eval's format; extra, not in the average)",
                     "acc", False, csqa_letter_example))
register(DatasetSpec("commonsense_qa_cloze", "choice", read_csqa_valid,
                     "CommonsenseQA validation, answer texts scored as ARC's (extra, not in the average)",
                     "acc_norm", False, csqa_cloze_example))
register(DatasetSpec("commonsense_qa_train", "records", read_csqa_train,
                     "CommonsenseQA training split (9,741 labelled questions, for federated fine-tuning)"))
