"""Chunked causal-LM loss: equal to Hugging Face's ``labels=`` loss (value and LoRA gradients)
through PEFT-wrapped tiny models of every family, with padding, sparse labels and no labels;
never holds the full logits; local client training gives the same update either way."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedprune.federated.local.chunked_loss import causal_lm_loss, chunked_causal_lm_loss
from fedprune.federated.local import ClientTask, TrainSettings, train_client
from fedprune.federated.lora import LoraSettings, SharedBaseModel, init_lora_state
from fedprune.federated.partition import IGNORE_INDEX, collate
from fedprune.fedpruner.memory import TrainSetup, saved_tensor_bytes
from fedprune.models.tiny import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def peft_tiny(arch: str, vocab: int = 128):
    model = tiny_model(arch, vocab_size=vocab)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B, so that every LoRA tensor gets a gradient
        g = torch.Generator().manual_seed(1)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.train()
    return pm


def make_batch(lengths, prompt_lens, vocab=128, seed=0, supervised=None):
    """Right-padded batch (``collate``); labels -100 on prompts (and padding); ``supervised``
    keeps only that many labelled tokens in total (the rest masked)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, p in zip(lengths, prompt_lens):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    batch = collate(examples, pad_id=0)
    if supervised is not None:
        lab = batch["labels"]
        pos = (lab[:, 1:] != IGNORE_INDEX).nonzero()
        for b, t in pos[supervised:].tolist():
            lab[b, t + 1] = IGNORE_INDEX
    return batch


def loss_and_grads(pm, fn):
    params = [p for p in pm.parameters() if p.requires_grad]
    torch.manual_seed(7)  # OPT has dropout in train mode: the same masks for both losses
    loss = fn()
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same(ref, got):
    (l0, g0), (l1, g1) = ref, got
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_equals_hf_loss_and_lora_grads_with_padding(arch, chunk):
    pm = peft_tiny(arch)
    batch = make_batch([20, 13, 7], [5, 3, 6])  # right padding, prompts masked
    ref = loss_and_grads(pm, lambda: pm(**batch).loss)
    got = loss_and_grads(pm, lambda: causal_lm_loss(pm, batch, chunk))
    assert_same(ref, got)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_equals_hf_loss_with_all_but_few_labels_masked(arch):
    pm = peft_tiny(arch)
    batch = make_batch([24, 24], [2, 2], supervised=3)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 3
    ref = loss_and_grads(pm, lambda: pm(**batch).loss)
    got = loss_and_grads(pm, lambda: causal_lm_loss(pm, batch, chunk_tokens=2))
    assert_same(ref, got)


def test_no_supervised_tokens_gives_zero_loss_and_zero_grads():
    pm = peft_tiny("llama")
    batch = make_batch([10, 6], [10, 6])  # prompts only
    assert (batch["labels"] == IGNORE_INDEX).all()
    with torch.no_grad():
        assert torch.isnan(pm(**batch).loss)  # the standard mean is 0 / 0
    loss, grads = loss_and_grads(pm, lambda: causal_lm_loss(pm, batch))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_pure_function_checks_and_no_grad():
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.randint(0, 11, (2, 5))
    ref = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    with torch.no_grad():  # evaluation: no checkpointing needed, same value
        torch.testing.assert_close(chunked_causal_lm_loss(hidden, labels, head, 3), ref)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_causal_lm_loss(hidden, labels, head, 0)
    with pytest.raises(ValueError, match="labels"):
        chunked_causal_lm_loss(hidden, labels[:, :4], head)


def test_full_logits_are_never_saved_for_backward():
    """Autograd saves the log-softmax output (N x V floats) for the standard loss; the chunked
    loss saves no vocabulary-sized tensor (each chunk's logits are recomputed in backward)."""
    V = 4096
    pm = peft_tiny("llama", vocab=V)
    batch = make_batch([64, 64], [0, 0], vocab=V)
    params = list(pm.parameters())

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    assert any(V in s for s in saved_shapes(lambda: pm(**batch).loss))
    assert not any(V in s for s in saved_shapes(lambda: causal_lm_loss(pm, batch, 16)))
    full = saved_tensor_bytes(lambda: pm(**batch).loss, params)
    chunked = saved_tensor_bytes(lambda: causal_lm_loss(pm, batch, 16), params)
    assert full - chunked >= 0.95 * batch["input_ids"].numel() * V * 4


def test_training_settings_default_on_and_memory_model_agrees():
    s = TrainSettings()
    assert s.chunked_loss is True
    assert s.loss_chunk_tokens == TrainSetup().loss_chunk_tokens and TrainSetup().chunked_loss is True
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        TrainSettings(loss_chunk_tokens=0)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_client_update_equals_standard_loss(arch):
    """train_client with the chunked loss gives the same LoRA update as with the model's own
    loss (LoRA dropout on, a layer subset and a head mask, two optimizer steps)."""
    model = tiny_model(arch)
    model.config.use_cache = False  # as the simulator runs it (a layer subset has no cache slots)
    lora = LoraSettings(rank=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"])
    base = SharedBaseModel(model, lora)
    state = init_lora_state(base.shapes, 4, seed=3)
    for k in state:
        if k.endswith("lora_B"):
            state[k] = 0.05 * torch.randn(state[k].shape, generator=torch.Generator().manual_seed(len(k)))
    examples = []
    g = torch.Generator().manual_seed(0)
    for n, p in [(18, 6), (11, 4), (15, 14), (9, 2)]:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    task = ClientTask(0, 1, 4, state, layers=[0, 2, 3], head_masks={2: torch.tensor([True, False, True, True])})
    out = {}
    for chunked in (False, True):
        settings = TrainSettings(local_steps=2, batch_size=2, grad_accum=2, seq_len=32, lr=1e-2,
                                 chunked_loss=chunked, loss_chunk_tokens=4)
        res, _ = train_client(base, task, examples, settings, seed=5, pad_id=0)
        out[chunked] = res
    assert out[True].lora.keys() == out[False].lora.keys()
    for k in out[False].lora:
        torch.testing.assert_close(out[True].lora[k], out[False].lora[k], rtol=1e-5, atol=1e-6)
    assert out[True].metrics["train_loss_first"] == pytest.approx(out[False].metrics["train_loss_first"], rel=1e-6)
