"""BitsDropout: the same inverted dropout as torch's, with a cheaper mask; swapped into LoRA layers."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from bigrec.llm.lora_dropout import BitsDropout, use_bits_dropout
from bigrec.stages.train import Config, lora_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_at_the_rate_and_scales_the_rest(dtype):
    torch.manual_seed(0)
    drop = BitsDropout(0.05)
    x = torch.rand(7, 301, 129, dtype=dtype) + 1.0  # odd sizes: the last 64-bit draw is partly used
    y = drop(x)
    assert y.shape == x.shape and y.dtype == dtype
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.05) < 0.003  # 272k elements: sd of the rate is 0.0004
    # Each of the four 16-bit lanes of a draw is random on its own (bit 63 of a draw is not used).
    lane_rates = [1 - kept.flatten()[i::4].float().mean().item() for i in range(4)]
    assert all(abs(r - 0.05) < 0.005 for r in lane_rates), lane_rates
    torch.testing.assert_close(y[kept], (x[kept].float() * drop.scale).to(dtype))
    assert drop.scale == pytest.approx(1 / (1 - 1638 / 32768))


def test_gradient_is_the_mask_and_eval_is_identity():
    torch.manual_seed(1)
    drop = BitsDropout(0.5)
    x = torch.randn(1000, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)
    drop.eval()
    assert drop(x) is x
    assert BitsDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        BitsDropout(1.0)


def test_same_seed_same_mask():
    x = torch.ones(4096)
    torch.manual_seed(3)
    a = BitsDropout(0.1)(x)
    torch.manual_seed(3)
    b = BitsDropout(0.1)(x)
    assert torch.equal(a, b) and not torch.equal(a, BitsDropout(0.1)(x))


def test_swapped_into_every_lora_layer(tiny_model_dir):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           lora_config(Config(train_data_path=["x"], lora_dropout=0.05)))
    layers = model.config.num_hidden_layers
    assert use_bits_dropout(model) == 2 * layers  # q_proj and v_proj
    drops = [m for m in model.modules() if isinstance(m, BitsDropout)]
    assert len(drops) == 2 * layers and all(d.p == 0.05 for d in drops)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_bits_dropout(model) == 0
    # No dropout configured: peft puts an Identity there, which stays.
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           lora_config(Config(train_data_path=["x"], lora_dropout=0.0)))
    assert use_bits_dropout(plain) == 0
