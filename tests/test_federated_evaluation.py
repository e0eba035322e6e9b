"""Evaluation-harness tasks on a run's global model (``evaluate_global_tasks``): the merged model
``W0 + base_delta + eval_delta`` is evaluated with LoRA off, and the base is left as it was."""
import pytest
import torch

from fedprune.federated.evaluation import evaluate_global_tasks
from fedprune.federated.lora import LoraSettings, SharedBaseModel
from fedprune.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the federated devices train their adapters and the server averages them. " * 12


def test_global_tasks_evaluate_the_merged_model_and_restore_the_base(tmp_path):
    from fedprune.federated.tiny_tokenizer import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    base = SharedBaseModel(model, LoraSettings(rank=2, target_modules=["q_proj", "down_proj"]))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    task = f"text:{path}"
    plain = evaluate_global_tasks(base, tok, {}, {}, [task], limit=2, seq_len=16, batch_size=2)
    key = sorted(base.shapes)[0]
    delta = {key: torch.full(base.shapes[key], 0.05)}
    weights = {k: m.base_layer.weight.detach().clone() for k, m in base.modules.items()}

    moved = evaluate_global_tasks(base, tok, {}, delta, [task], limit=2, seq_len=16, batch_size=2)
    again = evaluate_global_tasks(base, tok, {}, {}, [task], limit=2, seq_len=16, batch_size=2)

    assert set(plain) == {"average", "results"} and plain["results"][task]["ppl"] > 1
    assert moved["results"][task]["ppl"] != pytest.approx(plain["results"][task]["ppl"])  # the delta was applied
    assert again["results"][task]["ppl"] == plain["results"][task]["ppl"]  # ... and removed afterwards
    for k, m in base.modules.items():
        assert torch.equal(m.base_layer.weight, weights[k]), k
    # base_delta and eval_delta add up: the same update given either way evaluates the same
    split = evaluate_global_tasks(base, tok, {key: delta[key] / 2}, {key: delta[key] / 2}, [task], limit=2,
                                  seq_len=16, batch_size=2)
    assert split["results"][task]["ppl"] == pytest.approx(moved["results"][task]["ppl"], rel=1e-5)
