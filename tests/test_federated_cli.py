"""`fedprune federate` and `fedprune report` end to end on a tiny model."""
import json
from pathlib import Path

import pytest
import torch

from fedprune.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "federated"


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)

TINY = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=4", "train.local_steps=1",
        "train.grad_accum=1", "train.seq_len=48", "federation.rounds=2", "federation.clients_per_round=2",
        "eval.loss_examples=4", "eval.rouge_examples=1", "eval.max_new_tokens=2"]


def test_federate_resume_and_report(tmp_path):
    run = tmp_path / "run"
    assert main(["federate", "--config", str(CONFIGS / "flexlora.yaml"), *TINY, "--output", str(run),
                 "--threads", "1"]) == 0
    assert (run / "config.yaml").read_text().count("strategy: flexlora") == 1
    # extend the finished run by one round
    assert main(["federate", "--resume", str(run), "federation.rounds=3", "--threads", "1"]) == 0
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "flexlora" in md and "| 3 |" in md
    for png in ("metrics_rounds.png", "metrics_simtime.png", "participation.png"):
        assert (run / png).stat().st_size > 0
    # a second run into the same directory is refused with advice
    assert main(["federate", "--config", str(CONFIGS / "flexlora.yaml"), *TINY, "--output", str(run)]) == 1


def test_federate_reports_config_errors(tmp_path, capsys):
    assert main(["federate", "--config", str(CONFIGS / "fedit.yaml"), "federation.strategy=nope",
                 "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "unknown" in err and "known:" in err and "fedit" in err and "flora" in err
