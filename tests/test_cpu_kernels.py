"""The CPU fast paths (cpu_kernels.py) compute the model's own function: GELU and attention equal
the originals, dropout keeps each element with probability 1 - p and scales by 1/(1-p)."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, make_model_dir, read_metrics, run_cli


def test_dropout_mask_keeps_1_minus_p_and_follows_the_seed():
    import torch

    from finetune.cpu_kernels import dropout_keep_mask

    for p in (0.1, 0.5):
        torch.manual_seed(0)
        mask = dropout_keep_mask((1000, 1000), p, "cpu")
        assert mask.shape == (1000, 1000) and mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - (1 - p)) < 0.002, p
        # Rows are independent draws (no repeated 16-bit pattern).
        assert not torch.equal(mask[0], mask[1])
    torch.manual_seed(0)
    first = dropout_keep_mask((7, 13), 0.1, "cpu")  # an element count not divisible by 4
    torch.manual_seed(0)
    assert torch.equal(first, dropout_keep_mask((7, 13), 0.1, "cpu"))


def test_fast_dropout_scales_kept_values_and_their_gradients():
    import torch

    from finetune.cpu_kernels import _fast_dropout_class

    dropout = _fast_dropout_class()(0.25)
    x = torch.randn(64, 256, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    dropout.eval()
    assert dropout(x) is x


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float"])
def test_attention_equals_the_reference_formula(monkeypatch, mask_kind):
    import torch
    import torch.nn.functional as F

    from finetune import cpu_kernels

    torch.manual_seed(0)
    query = torch.randn(2, 4, 6, 8)
    key, value = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)  # grouped-query: 2 kv heads for 4 heads
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    padding = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    padding[1, :, :, :2] = False  # the second row's first two tokens are padding
    allowed = causal & padding
    mask = {"causal": None, "bool": allowed, "float": torch.zeros(2, 1, 6, 6).masked_fill(~allowed, -1e9)}[mask_kind]
    if mask_kind == "causal":
        allowed = causal.expand(2, 1, 6, 6)
    keep = torch.rand(2, 4, 6, 6) > 0.3
    monkeypatch.setattr(cpu_kernels, "dropout_keep_mask", lambda shape, p, device: keep)
    module = torch.nn.Module()
    module.num_key_value_groups = 2  # what transformers' attention modules carry for grouped-query attention
    out, _ = cpu_kernels.attention(module, query, key, value, mask, scaling=0.5, dropout=0.3)

    k, v = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    scores = (query @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num() * keep / 0.7
    expected = (probs @ v).transpose(1, 2)
    rows = allowed.any(-1).expand(2, 4, 6).transpose(1, 2)  # query rows with something to attend to
    assert torch.allclose(out[rows], expected[rows], atol=1e-5)
    # Without dropout it is SDPA itself.
    out, _ = cpu_kernels.attention(module, query, key, value, mask, scaling=0.5, dropout=0.0)
    reference = F.scaled_dot_product_attention(
        query, k, v, attn_mask=None if mask is None else allowed, is_causal=mask is None, scale=0.5
    ).transpose(1, 2)
    assert torch.allclose(out[rows], reference[rows], atol=1e-5)


def test_swapped_model_gives_the_same_loss_gradients_and_eval_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import cpu_kernels

    model_dir = make_model_dir(tmp_path / "gpt2", "gpt2", dropout=True)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fast = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert cpu_kernels.apply(fast)[:3] == ["GELU", "allocator", "attention"]
    assert fast.config._attn_implementation == cpu_kernels.ATTENTION_NAME
    ids = torch.randint(0, plain.config.vocab_size, (3, 40))
    for model in (plain, fast):
        model.eval()  # no dropout: the swapped model must be the same function
    assert torch.allclose(plain(input_ids=ids).logits, fast(input_ids=ids).logits, atol=1e-5)
    for model in (plain, fast):  # training mode with dropout rates set to zero: same loss and gradients
        model.train()
        for module in model.modules():
            if hasattr(module, "p"):
                module.p = 0.0
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    # The swap is not saved: the checkpoint loads anywhere with the stock attention.
    fast.save_pretrained(tmp_path / "saved")
    assert cpu_kernels.ATTENTION_NAME not in (tmp_path / "saved/config.json").read_text()


def test_cli_runs_with_and_without_cpu_kernels(workdir, tmp_path):
    plain_dir = make_model_dir(tmp_path / "plain", "gpt2", dropout=False)
    base = [
        "train",
        SAMPLE,
        "--model",
        plain_dir,
        "--steps",
        3,
        "--batch-size",
        4,
        "--block-size",
        32,
        "--log-every",
        1,
        "--eval-every",
        0,
        "--sample-every",
        0,
    ]
    fast = run_cli(*base, "--run-name", "fast")
    run_cli(*base, "--run-name", "slow", "--no-cpu-kernels")
    assert "CPU fast paths: GELU" in fast.stderr
    a = [m["loss"] for m in read_metrics(workdir / "runs/fast") if "loss" in m]
    b = [m["loss"] for m in read_metrics(workdir / "runs/slow") if "loss" in m]
    assert len(a) == 3 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    # With dropout on, training with the fast dropout learns like the stock one.
    drop_dir = make_model_dir(tmp_path / "drop", "gpt2", dropout=True)
    longer = [*base[:3], drop_dir, "--steps", 30, *base[6:]]
    run_cli(*longer, "--run-name", "drop-fast", "--lr", "3e-3")
    run_cli(*longer, "--run-name", "drop-slow", "--lr", "3e-3", "--no-cpu-kernels")
    a = [m["loss"] for m in read_metrics(workdir / "runs/drop-fast") if "loss" in m]
    b = [m["loss"] for m in read_metrics(workdir / "runs/drop-slow") if "loss" in m]
    assert a[-1] < a[0] - 1.0 and abs(sum(a[-5:]) / 5 - sum(b[-5:]) / 5) < 0.3, (a, b)
    config = json.loads((workdir / "runs/drop-fast/checkpoint-000030/config.json").read_text())
    assert config["attn_pdrop"] == 0.1 and "finetune_cpu" not in json.dumps(config)


def test_recomputed_dropout_masks_match_with_gradient_checkpointing(tmp_path):
    """Activation recomputation replays the RNG, so the fast dropout draws the same masks twice."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import cpu_kernels

    model_dir = make_model_dir(tmp_path / "gpt2", "gpt2", dropout=True)
    results = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cpu_kernels.apply(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(5)
        ids = torch.randint(0, model.config.vocab_size, (2, 40))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
