"""Preference tuning: the losses equal trl's on the same log-probabilities, the pair readers (LLaMA-Factory's ranking
formats, OpenAI messages, trl's prompt/chosen/rejected) name bad records, the cached reference log-probabilities equal
transformers' on the same tokens, and a tiny DPO / IPO / ORPO / SimPO run learns the preference."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers

from lmforge.chat.templates import BUILTIN_TEMPLATES
from lmforge.data.sources import CorpusError
from lmforge.finetune.conversations import DataFormatError
from lmforge.finetune.preference import build_pairs, collate_pairs, load_pairs, reference_logps
from lmforge.finetune.run import FinetuneConfig, run_finetune
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from lmforge.train.objectives import preference_losses

QA = [("北京是哪个国家的首都？", "北京是中国的首都。", "我不知道。"),
      ("What is two plus two?", "Two plus two is four.", "I don't know."),
      ("上海在哪里？", "上海在中国东部的长江口。", "我不知道。"),
      ("Name a primary colour.", "Red is a primary colour.", "I don't know."),
      ("水的化学式是什么？", "水的化学式是H2O。", "我不知道。"),
      ("What does CPU stand for?", "Central processing unit.", "I don't know."),
      ("一年有几个月？", "一年有十二个月。", "我不知道。"),
      ("Which planet is largest?", "Jupiter is the largest planet.", "I don't know.")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def logps():
    g = torch.Generator().manual_seed(0)
    n = 64
    c, r = -torch.rand(n, generator=g) * 40 - 1, -torch.rand(n, generator=g) * 40 - 1
    rc, rr = c + torch.randn(n, generator=g), r + torch.randn(n, generator=g)
    nc, nr = torch.randint(1, 30, (n,), generator=g), torch.randint(1, 30, (n,), generator=g)
    return c, r, rc, rr, nc, nr


def test_losses_equal_trl_on_the_same_log_probabilities(logps):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    c, r, rc, rr, nc, nr = logps
    acc = SimpleNamespace(device="cpu")

    def cpo(loss_type, chosen, rejected, beta, ls=0.0, gamma=0.5):
        me = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=ls, simpo_gamma=gamma,
                             accelerator=acc)
        return CPOTrainer.cpo_loss(me, chosen, rejected)[0]

    # DPO (sigmoid, conservative with label smoothing) is trl's sigmoid loss on the log-ratios to the reference
    for ls in (0.0, 0.1):
        ours = preference_losses("dpo", c, r, nc, nr, rc, rr, beta=0.1, label_smoothing=ls)[0]
        torch.testing.assert_close(ours, cpo("sigmoid", c - rc, r - rr, 0.1, ls))
    # IPO: trl's squared loss on the per-token log-ratio margins
    ours = preference_losses("ipo", c, r, nc, nr, rc, rr, beta=0.1)[0]
    torch.testing.assert_close(ours, cpo("ipo", (c - rc) / nc, (r - rr) / nr, 0.1))
    # SimPO: trl's CPO trainer with loss_type="simpo" on per-token log-probabilities
    for ls in (0.0, 0.2):
        ours = preference_losses("simpo", c, r, nc, nr, beta=2.0, label_smoothing=ls, simpo_gamma=1.0)[0]
        torch.testing.assert_close(ours, cpo("simpo", c / nc, r / nr, 2.0, ls, gamma=1.0))
    # ORPO's odds-ratio term: trl returns beta * logsigmoid(log odds), the loss is its negative
    ours, rew_c, rew_r = preference_losses("orpo", c, r, nc, nr, beta=0.1)
    theirs = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.1, accelerator=acc), c / nc, r / nr)
    torch.testing.assert_close(ours, -theirs[0])
    torch.testing.assert_close(rew_c, theirs[1])
    # the DPO rewards are beta x the log-ratios
    _, rew_c, rew_r = preference_losses("dpo", c, r, nc, nr, rc, rr, beta=0.1)
    torch.testing.assert_close(rew_c, 0.1 * (c - rc))


def test_pair_readers_take_every_format_and_name_bad_records(tmp_path):
    sharegpt = _jsonl(tmp_path / "dpo_zh_demo.jsonl", [{
        "conversations": [{"from": "human", "value": "北京是哪个国家的首都？"}],
        "chosen": {"from": "gpt", "value": "北京是中国的首都。"}, "rejected": {"from": "gpt", "value": "我不知道。"}}])
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": "2 and 2", "chosen": "4",
                                                  "rejected": "5"}])
    openai = _jsonl(tmp_path / "openai.jsonl", [{"messages": [{"role": "user", "content": "Hi"}],
                                                  "chosen": [{"role": "assistant", "content": "Hello!"}],
                                                  "rejected": {"role": "assistant", "content": "Go away."}}])
    trl_rows = _jsonl(tmp_path / "trl.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "dpo_zh_demo": {"file_name": "dpo_zh_demo.jsonl", "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "sft": {"file_name": "alpaca.jsonl"}}), encoding="utf-8")
    got = load_pairs(f"{tmp_path}/dataset_info.json#dpo_zh_demo")[0]
    assert got.chosen.messages == [{"role": "user", "content": "北京是哪个国家的首都？"},
                                   {"role": "assistant", "content": "北京是中国的首都。"}]
    assert got.rejected.messages[-1]["content"] == "我不知道。"
    assert load_pairs(str(sharegpt))[0].chosen.messages == got.chosen.messages
    a = load_pairs(str(alpaca))[0]
    assert a.chosen.messages[0]["content"] == "Add\n2 and 2" and a.rejected.messages[-1]["content"] == "5"
    for f in (openai, trl_rows):
        p = load_pairs(str(f))[0]
        assert [m["content"] for m in p.chosen.messages] == ["Hi", "Hello!"] and p.rejected.messages[-1]["content"] \
            == "Go away."
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="not a ranking dataset"):
        load_pairs(f"{tmp_path}/dataset_info.json#sft")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
                                          {"prompt": "Hi", "chosen": "same", "rejected": "same"},
                                          {"prompt": "Hi", "chosen": "Hello!"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: fields 'chosen' and 'rejected' are the same"):
        load_pairs(str(bad))
    rejects = []
    assert len(load_pairs(str(bad), on_bad=lambda w, r, raw: rejects.append((w, r)))) == 1
    assert [w.rsplit(":", 1)[1] for w, _ in rejects] == ["2", "3"] and "'rejected' is missing" in rejects[1][1]
    with pytest.raises(CorpusError, match="no valid preference pairs"):
        load_pairs(str(_jsonl(tmp_path / "none.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "a"}])),
                   on_bad=lambda *a: None)


@pytest.fixture(scope="module")
def base_model(trained_dir, tmp_path_factory):
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("pref_base"), trained_dir)


def test_reference_log_probabilities_equal_transformers(base_model, tmp_path):
    tok = load_tokenizer(base_model)
    pairs = load_pairs(str(_jsonl(tmp_path / "p.jsonl", [{"prompt": q, "chosen": a, "rejected": b}
                                                          for q, a, b in QA])))
    ex = build_pairs(tok, BUILTIN_TEMPLATES["chatml"], pairs, 64)
    model = load_hf_model(base_model)
    ref = reference_logps(model, ex, pad_id=0, batch_size=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_model).eval()
    batch = collate_pairs(ex, list(range(len(ex))), 0)
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    token = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    sums = (token * (labels != -100)).sum(1)
    n = len(ex)
    torch.testing.assert_close(torch.from_numpy(ref[:, 0]).float(), sums[:n], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(ref[:, 1]).float(), sums[n:], atol=1e-4, rtol=1e-5)
    # the masked part of each side is exactly its reply: the first reply token is trained (no off-by-one)
    first = (labels[0] != -100).nonzero()[0, 0]
    reply = tok.encode(QA[0][1])
    assert labels[0, first:first + len(reply)].tolist() == reply


@pytest.mark.parametrize("objective,method", [("dpo", "lora"), ("ipo", "full"), ("orpo", "lora"), ("simpo", "lora")])
def test_preference_tuning_learns_the_preference(base_model, tmp_path, objective, method):
    rows = [{"prompt": q, "chosen": a, "rejected": b} for q, a, b in QA] * 4
    data = _jsonl(tmp_path / "pairs.jsonl", rows)
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": q, "chosen": a, "rejected": b} for q, a, b in QA])
    lr = 5e-3 if method == "lora" else 1e-3
    cfg = FinetuneConfig(model=str(base_model), data=str(data), val_data=str(val), out=str(tmp_path / "run"),
                         objective=objective, method=method, template="chatml", max_steps=30, batch_size=4, lr=lr,
                         warmup_steps=2, eval_every=15, max_length=64, progress=False, samples=1, sample_tokens=4)
    summary = run_finetune(cfg)
    first, last = summary["initial"], summary["final"]
    assert last["val_loss"] < first["val_loss"]
    assert last["val_reward_margin"] > first["val_reward_margin"]
    assert last["val_reward_accuracy"] >= 0.75
    best = tmp_path / "run" / "best"
    assert (best / ("adapter_config.json" if method == "lora" else "model.safetensors")).exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_reward_accuracy" in rows[0] and "val_rougeL" in rows[0]


def test_dpo_resume_equals_an_uninterrupted_run(base_model, tmp_path):
    rows = [{"prompt": q, "chosen": a, "rejected": b} for q, a, b in QA] * 3
    data = _jsonl(tmp_path / "pairs.jsonl", rows)

    def cfg(out, **kw):
        return FinetuneConfig(model=str(base_model), data=str(data), out=str(out), objective="dpo", template="chatml",
                              max_steps=12, batch_size=4, lr=5e-3, warmup_steps=2, eval_every=6, max_length=64,
                              progress=False, samples=0, val_fraction=0.2, **kw)

    run_finetune(cfg(tmp_path / "full"))
    import lmforge.train.trainer as T

    fit = T.Trainer.fit
    T.Trainer.fit = lambda self, until_step=None, time_budget_s=None: fit(self, until_step=6)
    try:
        run_finetune(cfg(tmp_path / "part"))
    finally:
        T.Trainer.fit = fit
    run_finetune(cfg(tmp_path / "part", resume=True))
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in a if "loss" in r] == pytest.approx([r.get("loss") for r in b if "loss" in r],
                                                                       rel=1e-4)
