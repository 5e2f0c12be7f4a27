"""The offline teacher cache: training from a cache whose top-k covers the vocabulary equals training with the live
teacher; a stopped cache run continues; other settings, data or temperature are refused with one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.distill.cache import CacheConfig, build_cache
from lmforge.finetune.run import run_finetune
from tests.finetune.test_distill import _cfg, data, student, teacher  # noqa: F401  (the same fixtures)


def _cache(teacher, data, out, **kw) -> CacheConfig:  # noqa: F811
    return CacheConfig(teacher=str(teacher), data=str(data), out=str(out), max_length=64, progress=False, **kw)


def test_a_full_vocabulary_cache_trains_as_the_live_teacher(student, teacher, data, tmp_path):  # noqa: F811
    manifest = build_cache(_cache(teacher, data, tmp_path / "cache", top_k=3000, precision="float32",
                                  kd_temperature=2.0, shard_examples=7))
    assert manifest["shards"] == 4 and manifest["examples"] == 24
    live = run_finetune(_cfg(student, teacher, data, tmp_path / "live", method="full", kd_temperature=2.0,
                             kd_loss="jsd", kd_beta=0.3, max_steps=3, eval_every=3))
    cached = run_finetune(_cfg(student, "", data, tmp_path / "cached", teacher_cache=str(tmp_path / "cache"),
                               method="full", kd_temperature=2.0, kd_loss="jsd", kd_beta=0.3, max_steps=3,
                               eval_every=3))
    for when in ("initial", "final"):
        for key in ("val_kd", "val_ce", "val_loss"):
            assert abs(live[when][key] - cached[when][key]) <= 1e-5, (when, key)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "live" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cached" / "last" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_stopped_cache_run_continues_and_other_settings_are_refused(teacher, data, tmp_path):  # noqa: F811
    out = tmp_path / "cache"
    build_cache(_cache(teacher, data, out, top_k=8, shard_examples=10))
    whole = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    (out / "shard-00002.safetensors").unlink()  # as a run stopped before its last shard
    (out / "manifest.json").unlink()
    build_cache(_cache(teacher, data, out, top_k=8, shard_examples=10))
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == whole
    assert json.loads((out / "manifest.json").read_text())["trained_tokens"] > 0
    with pytest.raises(ConfigError, match="top_k: 8 there, 16 now"):
        build_cache(_cache(teacher, data, out, top_k=16, shard_examples=10))


def test_training_refuses_other_data_and_another_temperature(student, teacher, data, tmp_path):  # noqa: F811
    build_cache(_cache(teacher, data, tmp_path / "cache", top_k=8))
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text(encoding="utf-8").replace("Jupiter", "Saturn") + json.dumps(
        {"instruction": "新问题", "input": "", "output": "新答案"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not in"):
        run_finetune(_cfg(student, "", other, tmp_path / "a", teacher_cache=str(tmp_path / "cache")))
    with pytest.raises(ConfigError, match="temperature 1.0"):
        run_finetune(_cfg(student, "", data, tmp_path / "b", teacher_cache=str(tmp_path / "cache"),
                          kd_temperature=2.0))
