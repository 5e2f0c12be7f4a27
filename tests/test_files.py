"""Artifacts: written as units (a crash leaves the previous one whole), with the permissions new files get."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from lmforge.model import Transformer, load_hf_model, preset, save_hf_model


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_directory_is_a_unit_with_normal_permissions(tmp_path, monkeypatch):
    torch.manual_seed(0)
    a = Transformer(preset("tiny-llama", eos_token_id=3, bos_token_id=2))
    out = tmp_path / "model"
    save_hf_model(a, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    for name in names:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()
    # transformers generates with the ids: it stops at EOS
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (2, 3)
    # a save that fails half-way leaves the previous model as it was, and no temporary files
    b = Transformer(preset("tiny-llama"))

    def broken(cfg):
        raise OSError("disk full")

    monkeypatch.setattr("lmforge.model.hf.generation_config", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf_model(b, out)
    assert sorted(p.name for p in out.iterdir()) == names
    ids = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        loaded = load_hf_model(out)
        assert torch.equal(loaded.logits(loaded(ids)), a.eval().logits(a(ids)))


def test_tokenizer_files_are_written_together(trained, tmp_path, monkeypatch):
    out = tmp_path / "tok"
    trained.save(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"tokenizer.json", "tokenizer_config.json"}
    monkeypatch.setattr("lmforge.tokenizer.formats._tokenizer_config", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trained.save(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
