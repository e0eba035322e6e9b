"""Datasets by name: text corpora, zero-shot tasks, Dolly clients, CommonsenseQA, calibration batches.

``DATASETS`` is the registry (``fedprune.registry.Registry``); files are read from the data
directory (``--data-dir`` > ``$FEDPRUNE_DATA`` > ``../shared/data``) and, when missing there,
from the public ``datasets`` source; see ``SOURCES.md`` of the data directory for formats.
"""
from .catalog import DATASETS, DatasetSpec, get_dataset, resolve_root
from .text import is_text_dataset, load_text
from .choice import SEVEN_TASKS, ChoiceExample, load_examples, load_records
from .csqa import csqa_train, csqa_valid
from .dolly import dolly_client, dolly_clients, dolly_global_test
from .calibration import calibration_corpus, calibration_samples

__all__ = [
    "DATASETS", "DatasetSpec", "get_dataset", "resolve_root", "is_text_dataset", "load_text", "SEVEN_TASKS",
    "ChoiceExample", "load_examples", "load_records", "dolly_client", "dolly_clients", "dolly_global_test",
    "calibration_corpus", "calibration_samples", "csqa_train", "csqa_valid",
]
