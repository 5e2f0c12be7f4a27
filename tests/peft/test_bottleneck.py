"""Bottleneck adapters: the base model exactly at the start, only the adapters train, and their directory round
trips through the adapter protocol."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import load_hf_model
from lmforge.peft import load_adapter, merge, save_adapter
from lmforge.peft.bottleneck import BottleneckConfig, apply_bottleneck


@pytest.fixture(scope="module")
def base_model(trained_dir, tmp_path_factory):
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("base"), trained_dir, max_positions=512)


def test_bottleneck_adapters_start_as_the_base_and_round_trip(base_model, tmp_path):
    from lmforge.config import ConfigError

    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    base = load_hf_model(base_model).eval()
    model = load_hf_model(base_model).eval()
    apply_bottleneck(model, BottleneckConfig(size=16))
    with torch.no_grad():
        plain = base.logits(base(ids))
        assert torch.equal(model.logits(model(ids)), plain)  # up starts at zero: the base model exactly
        for name, p in model.named_parameters():
            if ".adapter.up." in name:
                p.normal_(0, 0.05)
        adapted = model.logits(model(ids))
    assert (adapted - plain).abs().max() > 1e-3
    assert all(".adapter." in n for n, p in model.named_parameters() if p.requires_grad)
    save_adapter(model, tmp_path / "ad", str(base_model))
    again = load_adapter(load_hf_model(base_model).eval(), tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(again.logits(again(ids)), adapted)
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge(again)
