"""The adapter protocol: a method defined here, one lmforge has never heard of, is trained, checkpointed, resumed and
saved by the Trainer with no change to train/ (the proof that the loop names no method), and loads back through
`load_adapter` with the trained model's logits."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lmforge.config import ConfigError
from lmforge.model import CheckpointError, Transformer, preset, save_hf_model
from lmforge.peft import Adapter, adapter_of, apply_adapter, load_adapter, merge, register_adapter
from lmforge.tokenizer.shards import TokenizeConfig, tokenize_corpus
from lmforge.train.trainer import TrainConfig, Trainer


@dataclass
class ScaleHeadConfig:
    init: float = 1.0


@register_adapter
class ScaleHead(Adapter):
    """The final hidden states (so the output head's columns) times one trainable vector; its own directory format
    (one tensor "scale"), not mergeable."""

    peft_type = "TEST_SCALE_HEAD"
    not_mergeable = "a test adapter that does not merge"

    def attach(self, model: nn.Module) -> None:
        ref = model.embed.weight
        self.scale = nn.Parameter(torch.full((model.cfg.d_model,), self.config.init, device=ref.device, dtype=ref.dtype))
        model.norm.register_forward_hook(lambda module, args, out: out * self.scale)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.scale]

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.detach().contiguous()}

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(tensors["scale"])

    def adapter_config(self, model: nn.Module) -> dict:
        return {"init": self.config.init, "d_model": model.cfg.d_model}

    @classmethod
    def from_adapter_config(cls, raw: dict, where: str) -> ScaleHead:
        return cls(ScaleHeadConfig(float(raw["init"])))


@pytest.fixture(scope="module")
def shards(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    tokenize_corpus(TokenizeConfig(input=["builtin:python-docs"], tokenizer=str(trained_dir), out=str(out),
                                   val_fraction=0.1, progress=False))
    return out


def _base(shards) -> Transformer:
    vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    return Transformer(preset("tiny-llama", vocab_size=vocab, max_seq_len=64))


def _adapted(shards) -> Transformer:
    model = _base(shards)
    apply_adapter(model, ScaleHead(ScaleHeadConfig()))
    return model


def _cfg(shards, out, **kw) -> TrainConfig:
    base = dict(data=str(shards), out=str(out), model="tiny-llama", max_length=32, batch_size=8, max_steps=6,
                lr=3e-2, warmup_steps=2, eval_every=3, eval_batches=2, progress=False, seed=1)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def test_a_new_method_is_trained_checkpointed_resumed_and_saved_by_the_trainer(shards, tmp_path):
    straight = Trainer(_cfg(shards, tmp_path / "straight"), model=_adapted(shards))
    summary = straight.fit()
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
    model = straight.model
    # only the method's vector trained: the base is the one it started from
    base = _base(shards)
    assert all(torch.equal(p, base.state_dict()[n]) for n, p in model.state_dict().items() if n != "peft.scale")
    assert not torch.equal(adapter_of(model).scale, torch.ones_like(adapter_of(model).scale))
    # its checkpoints are its own adapter directory, nothing of the base
    for name in ("best", "last"):
        saved = json.loads((tmp_path / "straight" / name / "adapter_config.json").read_text())
        assert saved["peft_type"] == "TEST_SCALE_HEAD" and saved["base_model_name_or_path"] == "tiny-llama"
        assert not (tmp_path / "straight" / name / "model.safetensors").exists()
    # stopped after step 3 and resumed: the same trajectory
    Trainer(_cfg(shards, tmp_path / "split"), model=_adapted(shards)).fit(until_step=3)
    Trainer(_cfg(shards, tmp_path / "split", resume=True), model=_adapted(shards)).fit()
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    # the directory loads onto a base model with the trained model's logits
    again = load_adapter(_base(shards), tmp_path / "straight" / "last")
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(again.logits(again(ids)), model.logits(model(ids)))
    # a full model save refuses it, and merging says why it cannot
    with pytest.raises(CheckpointError, match="has an adapter"):
        save_hf_model(model, tmp_path / "full")
    with pytest.raises(ConfigError, match="does not merge"):
        merge(again)
