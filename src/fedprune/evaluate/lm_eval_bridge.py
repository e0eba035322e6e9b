"""lm-evaluation-harness's own task code over fedprune's local records (for cross-checks).

``lm_eval_task(task, records)`` builds lm-eval's ``ConfigurableTask`` from its YAML (the
installed ``lm_eval/tasks/...``) with the dataset replaced by the given records, so lm-eval's
``doc_to_text`` / ``doc_to_choice`` / ``process_results`` run offline on exactly the examples
fedprune scores. Used by the tests and ``benchmarks/eval/run_baseline.py``; needs the
``eval`` extra (``pip install 'fedprune[eval]'``).
"""
from __future__ import annotations

from pathlib import Path

TASK_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "siqa": "siqa/siqa.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
}


def lm_eval_task(task: str, records: list[dict]):
    """lm-eval's ConfigurableTask for ``task`` whose documents are ``records`` (HF-shaped).

    Local HellaSwag records are already preprocessed (``query``/``choices``/``gold``), so
    lm-eval's ``process_docs`` is skipped for them; hub-shaped records go through it.
    """
    from ..extras import require

    lm_eval = require("lm_eval", "running lm-evaluation-harness's task code")
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / TASK_YAMLS[task])
    if task == "hellaswag" and records and "query" in records[0]:
        records = [{**r, "label": str(r["gold"])} for r in records]
        config["process_docs"] = None
    docs = datasets.Dataset.from_list(records)
    splits = datasets.DatasetDict({"train": docs, "validation": docs, "test": docs})
    config["custom_dataset"] = lambda **_: splits
    return ConfigurableTask(config=config)


def lm_eval_requests(task) -> list[list]:
    """Per document (in order), its loglikelihood ``Instance``s in choice order (0-shot)."""
    task.build_all_requests(rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return [sorted(by_doc[d], key=lambda i: i.idx) for d in sorted(by_doc)]


def lm_eval_metrics(task, per_doc: list[list], lls: list[float]) -> dict[str, float]:
    """acc (and acc_norm where the task's YAML asks for it) from lm-eval's own ``process_results``.

    per_doc: from :func:`lm_eval_requests`; lls: one log-likelihood per request, in that order.
    """
    docs = list(task.eval_docs)
    sums: dict[str, float] = {}
    k = 0
    for doc_id, insts in enumerate(per_doc):
        res = task.process_results(docs[doc_id], [(ll, False) for ll in lls[k:k + len(insts)]])
        k += len(insts)
        for m in ("acc", "acc_norm"):
            if m in res:
                sums[m] = sums.get(m, 0.0) + res[m]
    return {m: v / len(per_doc) for m, v in sums.items()}
