"""Every shipped recipe builds the model its description names, and preset overrides keep derived fields right."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from lmforge.config import load_config
from lmforge.model import Transformer, preset
from lmforge.train.trainer import TrainConfig

# the vocabulary each recipe's comment tells the user to train (GPT-2's own, SmolLM2's preset)
VOCAB = {"pretrain-tiny-cpu": 4096, "pretrain-gpt2-124m": 50257, "pretrain-smollm-135m": 49152}


@pytest.mark.parametrize("name", sorted(VOCAB))
def test_recipe_builds_the_model_it_describes(name):
    text = resources.files("lmforge").joinpath(f"recipes/{name}.yaml").read_text()
    described = float(re.search(r"(\d+(?:\.\d+)?) ?M\b", text.splitlines()[0]).group(1))
    cfg = load_config(TrainConfig, f"recipe:{name}", {})
    model_cfg = preset(cfg.model, **{"vocab_size": VOCAB[name], **cfg.model_overrides})
    assert model_cfg.n_heads * model_cfg.head_dim == model_cfg.d_model  # attention as wide as the model
    assert model_cfg.num_params() / 1e6 == pytest.approx(described, rel=0.03)
    assert sum(p.numel() for p in Transformer(model_cfg).parameters()) == model_cfg.num_params()


def test_preset_overrides_recompute_derived_fields():
    gpt2 = preset("gpt2", n_heads=16)
    assert (gpt2.n_heads, gpt2.n_kv_heads, gpt2.head_dim) == (16, 16, 48)
    wide = preset("tiny-llama", d_model=256)  # the documented --model-overrides '{d_model: 256}'
    assert wide.head_dim == 64 and wide.n_kv_heads == 2
    gqa = preset("tiny-llama", n_heads=8)  # 2 query heads per KV head, kept
    assert (gqa.n_kv_heads, gqa.head_dim) == (4, 8)
    assert preset("gpt2", d_model=512, n_heads=8).d_ff == 2048
    assert preset("tiny-llama", head_dim=32).head_dim == 32  # given explicitly: kept
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        preset("tiny-llama", n_layer=3)
    with pytest.raises(ValueError, match="query heads per KV head"):
        preset("tiny-llama", n_heads=5)


def test_finetune_recipes_load_as_finetune_configs():
    from lmforge.finetune.run import FinetuneConfig, check_config

    names = sorted(p.name[:-5] for p in resources.files("lmforge").joinpath("recipes").iterdir()
                   if p.name.startswith("finetune-"))
    assert len(names) >= 4
    for name in names:
        cfg = load_config(FinetuneConfig, f"recipe:{name}", {"model": "m", "data": "d"} if "cpu" in name else
                          {"data": "d"})
        check_config(cfg)  # a valid method and settings
        assert cfg.method in ("lora", "dora", "qlora")
