"""prospect.kernels: the lean gated MLP gives the plain forward's values and gradients, bit for bit,
and keeps one [tokens, intermediate] activation less per layer for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prospect.kernels import SiluMul, use_lean_mlp


def test_silu_mul_equals_autograd_of_the_plain_ops():
    torch.manual_seed(0)
    gate = torch.randn(37, 96, dtype=torch.float64, requires_grad=True)
    up = torch.randn(37, 96, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(37, 96, dtype=torch.float64)
    plain = F.silu(gate) * up
    lean = SiluMul.apply(gate, up)
    assert torch.equal(plain, lean)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(plain, (gate, up), grad),
                                                 torch.autograd.grad(lean, (gate, up), grad)))
    assert torch.autograd.gradcheck(SiluMul.apply, (gate[:3, :5].detach().requires_grad_(),
                                                    up[:3, :5].detach().requires_grad_()))


def _saved_bytes_and_grads(model, ids):
    """Bytes of the distinct tensors autograd keeps for backward (parameters excluded), the loss, the grads."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return sum(storages.values()), loss.detach(), grads


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_lean_mlp_same_loss_and_grads_with_less_saved(tmp_path, smollm_tokenizer, architecture):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model_dir

    folder = build_tiny_model_dir(tmp_path, smollm_tokenizer, architecture=architecture)
    ids = torch.randint(0, 1000, (1, 50), generator=torch.Generator().manual_seed(1))
    results = []
    for lean in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        if lean:
            assert use_lean_mlp(model) == model.config.num_hidden_layers
        torch.manual_seed(2)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        results.append(_saved_bytes_and_grads(model, ids))
    (plain_bytes, plain_loss, plain_grads), (lean_bytes, lean_loss, lean_grads) = results
    assert torch.equal(plain_loss, lean_loss)
    assert plain_grads.keys() == lean_grads.keys() and len(plain_grads) > 0
    assert all(torch.equal(plain_grads[name], lean_grads[name]) for name in plain_grads)
    one_activation = 50 * 128 * 4  # tokens × intermediate_size × float32
    assert plain_bytes - lean_bytes == model.config.num_hidden_layers * one_activation  # silu(gate(x)), per layer
