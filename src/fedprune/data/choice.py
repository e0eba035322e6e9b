"""Zero-shot multiple-choice tasks, written the way lm-evaluation-harness 0.4 writes them.

Each task has a reader giving Hugging-Face-shaped records (the field names of the public
dataset lm-eval loads, so a record read from the local file and one downloaded from the
hub go through the same ``to_example``) and a ``to_example`` that builds the prompts of
``lm_eval/tasks/<task>/*.yaml``:

| task | context | choices | reported |
|---|---|---|---|
| boolq | ``{passage}\\nQuestion: {question}?\\nAnswer:`` | `` no``, `` yes`` | acc |
| piqa | ``Question: {goal}\\nAnswer:`` | `` {sol1}``, `` {sol2}`` | acc |
| hellaswag | ``{activity_label}: {ctx}`` | `` {ending}`` x4 | acc_norm |
| winogrande | sentence up to ``_`` with each option | `` {rest after _}`` (partial scoring) | acc |
| arc_easy / arc_challenge | ``Question: {stem}\\nAnswer:`` | `` {text}`` | acc / acc_norm |
| openbookqa | ``{question_stem}`` | `` {text}`` | acc_norm |
| siqa (extra) | ``Q: {context} {question}\\nA:`` | `` {answerX}`` x3 | acc |
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .catalog import DatasetSpec, get_dataset, local_or_hub, register, resolve_root
from ..options import require_int
from .files import read_json, read_jsonl, read_text

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice item, as the (context, continuation) requests lm-eval scores.

    requests: one ``(context, continuation)`` per choice; the choice's log-likelihood is
        the summed log-probability of the continuation's tokens given the context.
    choices: the strings lm-eval's ``doc_to_choice`` returns; ``acc_norm`` divides each
        log-likelihood by ``len(choices[i])`` (characters, without the delimiter).
    label: index of the right choice.
    """

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    label: int

    def __post_init__(self):
        if len(self.requests) != len(self.choices) or not self.requests:
            raise ValueError("a ChoiceExample needs one request per choice")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} out of range for {len(self.choices)} choices")


def multiple_choice(context: str, choices: list[str], label: int) -> ChoiceExample:
    """Same context, one continuation per choice (``" " + choice``)."""
    return ChoiceExample(tuple((context, TARGET_DELIMITER + c) for c in choices), tuple(choices), int(label))


def multiple_input(contexts: list[str], target: str, label: int) -> ChoiceExample:
    """One context per choice, one shared continuation (winogrande's partial scoring)."""
    return ChoiceExample(tuple((c, TARGET_DELIMITER + target) for c in contexts), tuple(contexts), int(label))


# ---- record -> example (lm-eval's doc_to_text / doc_to_choice / doc_to_target) ----

def boolq_example(doc: dict) -> ChoiceExample:
    return multiple_choice(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], doc["label"])


def piqa_example(doc: dict) -> ChoiceExample:
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict) -> ChoiceExample:
    if "query" not in doc:  # a hub record: lm-eval's process_docs
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        doc = {"query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
               "choices": [hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return multiple_choice(doc["query"], list(doc["choices"]), doc["gold"])


def winogrande_example(doc: dict) -> ChoiceExample:
    idx = doc["sentence"].index("_")
    contexts = [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
    target = doc["sentence"][idx + 1:].strip()
    return multiple_input(contexts, target, {"1": 0, "2": 1}[str(doc["answer"])])


def arc_example(doc: dict) -> ChoiceExample:
    labels = list(doc["choices"]["label"])
    return multiple_choice(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]),
                           labels.index(doc["answerKey"]))


def openbookqa_example(doc: dict) -> ChoiceExample:
    labels = list(doc["choices"]["label"])
    return multiple_choice(doc["question_stem"], list(doc["choices"]["text"]), labels.index(doc["answerKey"].lstrip()))


def siqa_example(doc: dict) -> ChoiceExample:
    return multiple_choice(f"Q: {doc['context']} {doc['question']}\nA:",
                           [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1)


# ---- local files -> Hugging-Face-shaped records ----

def _labels(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def _zip_labels(records: list[dict], labels: list[str], what: str) -> tuple[list[dict], list[str]]:
    if len(records) != len(labels):
        raise ValueError(f"{what}: {len(records)} records but {len(labels)} labels")
    return records, labels


def read_boolq(root: Path) -> list[dict]:
    def local(p: Path) -> list[dict]:
        out = []
        for r in read_jsonl(p):
            label = r["label"]
            label = {"true": 1, "false": 0}[label.lower()] if isinstance(label, str) else int(label)
            out.append({"question": r["question"], "passage": r["passage"], "label": label})
        return out

    return local_or_hub(root, ("boolq/val.jsonl",), local, ("aps/super_glue", "boolq", "validation"), list)


def read_piqa(root: Path) -> list[dict]:
    def local(p: Path, lab: Path) -> list[dict]:
        recs, labels = _zip_labels(read_jsonl(p), _labels(lab), "piqa")
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(l)} for r, l in zip(recs, labels)]

    return local_or_hub(root, ("piqa/dev.jsonl", "piqa/dev-labels.lst"), local, ("baber/piqa", None, "validation"), list)


def parse_hellaswag_text(text: str) -> list[dict]:
    """The llama.cpp layout: 6 lines per task (context, gold label, 4 endings)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise ValueError(f"hellaswag text file has {len(lines)} lines, not a multiple of 6")
    out = []
    for i in range(0, len(lines), 6):
        out.append({"query": hellaswag_query(lines[i]), "gold": int(lines[i + 1]),
                    "choices": [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]]})
    return out


def hellaswag_query(line: str) -> str:
    """Bring a llama.cpp-format context closer to lm-eval's query.

    lm-eval writes ``ctx_a + " " + ctx_b.capitalize()``; the file only has ``ctx_a + " " + ctx_b``.
    For ActivityNet items ``ctx_b`` is the lower-case fragment after the last sentence, so
    when the text after the last ``". "`` starts in lower case it is capitalised the same way.
    """
    head, sep, tail = line.rpartition(". ")
    if sep and tail[:1].islower():
        line = head + sep + tail.capitalize()
    return hellaswag_preprocess(line)


def _hellaswag_file(p: Path) -> list[dict]:
    text = read_text(p)
    try:
        return parse_hellaswag_text(text)
    except ValueError as exc:
        raise ValueError(f"malformed data file {p}: {exc}") from None


def read_hellaswag(root: Path) -> list[dict]:
    return local_or_hub(root, ("hellaswag/hellaswag_val_full.txt",), _hellaswag_file,
                        ("Rowan/hellaswag", None, "validation"), list)


_WINO = re.compile(r"Please choose the correct answer to fill in the blank to complete the given sentence: "
                   r"(?P<sentence>.*)\n\nOption1: (?P<option1>.*) Option2: (?P<option2>.*) "
                   r"Answer format: option1/option2", re.DOTALL)


def parse_winogrande_instruction(instruction: str) -> dict:
    """Recover sentence and options from an LLM-Adapters winogrande instruction."""
    m = _WINO.fullmatch(instruction)
    if m is None or "_" not in m["sentence"]:
        raise ValueError(f"not an LLM-Adapters winogrande instruction: {instruction[:80]!r}")
    return {"sentence": m["sentence"], "option1": m["option1"], "option2": m["option2"]}


def read_winogrande(root: Path) -> list[dict]:
    def local(p: Path, lab: Path) -> list[dict]:
        recs, labels = _zip_labels(read_json(p), _labels(lab), "winogrande")
        out = []
        for r, l in zip(recs, labels):
            if r.get("answer") not in (None, f"option{l}"):
                raise ValueError(f"winogrande: LLM-Adapters answer {r['answer']!r} disagrees with label {l}")
            out.append({**parse_winogrande_instruction(r["instruction"]), "answer": l})
        return out

    return local_or_hub(root, ("llm-adapters/winogrande/test.json", "winogrande/dev-labels.lst"), local,
                        ("allenai/winogrande", "winogrande_xl", "validation"), list)


def _arc_reader(relpath: str, config: str):
    def local(p: Path) -> list[dict]:
        out = []
        for r in read_jsonl(p):
            q = r["question"]
            out.append({"question": q["stem"], "answerKey": r["answerKey"],
                        "choices": {"text": [c["text"] for c in q["choices"]],
                                    "label": [c["label"] for c in q["choices"]]}})
        return out

    return lambda root: local_or_hub(root, (relpath,), local, ("allenai/ai2_arc", config, "test"), list)


_OBQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def parse_openbookqa_choices(text: str) -> dict:
    """``"(A) x (B) y ..."`` -> ``{"text": [x, y, ...], "label": ["A", "B", ...]}``."""
    parts = _OBQA_CHOICE.split(text.strip())
    if parts[0].strip() or len(parts) < 5:
        raise ValueError(f"cannot parse openbookqa choices {text!r}")
    labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    return {"text": texts, "label": labels}


def read_openbookqa(root: Path) -> list[dict]:
    def local(p: Path) -> list[dict]:
        with open(p, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [{"question_stem": r["Question Stem"], "choices": parse_openbookqa_choices(r["Choices"]),
                 "answerKey": r["Answer Key"]} for r in rows]

    return local_or_hub(root, ("openbookqa/test.tsv",), local, ("allenai/openbookqa", "main", "test"), list)


def read_siqa(root: Path) -> list[dict]:
    def local(p: Path, lab: Path) -> list[dict]:
        recs, labels = _zip_labels(read_jsonl(p), _labels(lab), "siqa")
        return [{**r, "label": l} for r, l in zip(recs, labels)]

    return local_or_hub(root, ("siqa/dev.jsonl", "siqa/dev-labels.lst"), local,
                        ("allenai/social_i_qa", None, "validation"), list)


SEVEN_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

for _spec in (
    DatasetSpec("boolq", "choice", read_boolq, "BoolQ validation (SuperGLUE)", "acc", True, boolq_example),
    DatasetSpec("piqa", "choice", read_piqa, "PIQA validation", "acc", True, piqa_example),
    DatasetSpec("hellaswag", "choice", read_hellaswag, "HellaSwag validation", "acc_norm", True, hellaswag_example),
    DatasetSpec("winogrande", "choice", read_winogrande, "WinoGrande-xl validation (partial scoring)", "acc", True,
                winogrande_example),
    DatasetSpec("arc_easy", "choice", _arc_reader("arc_easy/ARC-Easy-Test.jsonl", "ARC-Easy"), "ARC-Easy test",
                "acc", True, arc_example),
    DatasetSpec("arc_challenge", "choice", _arc_reader("arc_challenge/ARC-Challenge-Test.jsonl", "ARC-Challenge"),
                "ARC-Challenge test", "acc_norm", True, arc_example),
    DatasetSpec("openbookqa", "choice", read_openbookqa, "OpenBookQA main test", "acc_norm", True, openbookqa_example),
    DatasetSpec("siqa", "choice", read_siqa, "Social IQa validation (extra, not in the average)", "acc", False,
                siqa_example),
):
    register(_spec)


def load_records(task: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Hugging-Face-shaped records of a zero-shot task, in file order."""
    spec = get_dataset(task)
    if spec.kind != "choice":
        raise ValueError(f"dataset {task!r} is a {spec.kind} dataset, not a zero-shot task")
    return spec.load(resolve_root(data_dir))


def load_examples(task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[ChoiceExample]:
    """The first ``limit`` (all when None) examples of a zero-shot task."""
    if limit is not None:
        require_int("limit", limit, 1)
    records = load_records(task, data_dir)
    if limit is not None:
        records = records[:limit]
    to_example = get_dataset(task).to_example
    return [to_example(r) for r in records]
