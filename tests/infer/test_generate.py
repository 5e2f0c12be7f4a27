"""Generation: cache == no cache == transformers.generate (greedy); batched == one by one; sampling filters."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import IncrementalDetokenizer, SamplingConfig, generate, generate_ids, process_logits, stream
from lmforge.model import Transformer, load_hf_model, preset
from tests.model.test_hf_interop import _hf_tiny, _save

PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 7, 1], [250, 12, 33, 44, 55, 66, 77, 88, 9, 10], [1]]


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = _save(_hf_tiny(request.param), path)
    return hf, load_hf_model(path)


def test_greedy_cache_equals_no_cache_equals_transformers(pair):
    hf, ours = pair
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    for prompt in PROMPTS:
        with_cache = generate_ids(ours, [prompt], cfg)[0]
        assert with_cache == generate_ids(ours, [prompt], cfg, use_cache=False)[0]
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0, eos_token_id=None)
        assert with_cache == out[0, len(prompt):].tolist()


def test_batched_generation_equals_one_by_one(pair):
    _, ours = pair
    cfg = SamplingConfig(max_new_tokens=15, temperature=0)
    one_by_one = [generate_ids(ours, [p], cfg)[0] for p in PROMPTS]
    assert generate_ids(ours, PROMPTS, cfg) == one_by_one
    assert generate_ids(ours, PROMPTS, cfg, use_cache=False) == one_by_one


def test_stop_tokens_and_seeded_sampling():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=300)).eval()
    greedy = generate_ids(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=12, temperature=0))[0]
    stopped = generate_ids(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=12, temperature=0,
                                                               stop_token_ids=[greedy[4]]))[0]
    assert stopped == greedy[:greedy.index(greedy[4]) + 1]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=50, top_p=0.9, seed=7)
    assert generate_ids(model, PROMPTS, cfg) == generate_ids(model, PROMPTS, cfg)
    assert generate_ids(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))[0] == greedy


def test_logit_processors_hand_worked():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: torch.isfinite(process_logits(logits, None, SamplingConfig(**kw)))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.8) == [True, True, False, False]    # 0.5 + 0.3 reaches 0.8
    assert keep(top_p=0.81) == [True, True, True, False]
    assert keep(min_p=0.35) == [True, True, False, False]   # threshold 0.35 * 0.5 = 0.175
    assert keep(min_p=0.7) == [True, False, False, False]   # threshold 0.35
    penal = process_logits(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1]]), SamplingConfig(repetition_penalty=2.0))
    assert penal.tolist() == [[1.0, -4.0, 1.0]]  # CTRL: positive / penalty, negative * penalty


def test_min_p_matches_transformers():
    from transformers.generation.logits_process import MinPLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for p in (0.05, 0.2):
        assert torch.equal(torch.isfinite(process_logits(logits, None, SamplingConfig(min_p=p))),
                           torch.isfinite(MinPLogitsWarper(p)(None, logits.clone())))
    for p in (0.5, 0.9):
        assert torch.equal(torch.isfinite(process_logits(logits, None, SamplingConfig(top_p=p))),
                           torch.isfinite(TopPLogitsWarper(p)(None, logits.clone())))


def test_incremental_detokenizer_never_splits_characters(trained):
    ids = [b for b in "你好, world 😀".encode()]  # one byte token per UTF-8 byte
    detok = IncrementalDetokenizer(trained)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "你好, world 😀"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["", "", "你"]


def test_text_generation_and_stream_agree(trained):
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)).eval()
    cfg = SamplingConfig(max_new_tokens=25, temperature=0)
    text = generate(model, trained, "def main():", cfg)
    assert "".join(stream(model, trained, "def main():", cfg)) == text
    stop = text[5:8]
    cut = generate(model, trained, "def main():", SamplingConfig(max_new_tokens=25, temperature=0, stop_strings=[stop]))
    assert cut == text[:text.find(stop)]
    assert "".join(stream(model, trained, "def main():", SamplingConfig(max_new_tokens=25, temperature=0,
                                                                       stop_strings=[stop]))) == cut


def test_generate_cli(trained, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model import save_hf_model

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)).eval()
    save_hf_model(model, tmp_path)
    trained.save(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "def main():", "--temperature", "0",
                 "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out == generate(model, trained, "def main():", SamplingConfig(max_new_tokens=10, temperature=0)) + "\n"
    # int8 weights, and the streamed decode compiled over a static cache: the text of the eager int8 model
    import copy

    from lmforge.model import quantize_int8

    assert main(["generate", "--model", str(tmp_path), "--prompt", "def main():", "--temperature", "0",
                 "--max-new-tokens", "10", "--quantize", "int8", "--compile"]) == 0
    int8 = quantize_int8(copy.deepcopy(model))
    want = generate(int8, trained, "def main():", SamplingConfig(max_new_tokens=10, temperature=0))
    assert capsys.readouterr().out == want + "\n"
    # lmforge's float32 CPU kernels, compiled: the float model's text
    assert main(["generate", "--model", str(tmp_path), "--prompt", "def main():", "--temperature", "0",
                 "--max-new-tokens", "10", "--pack", "--compile"]) == 0
    assert capsys.readouterr().out == generate(model, trained, "def main():",
                                               SamplingConfig(max_new_tokens=10, temperature=0)) + "\n"
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "lmforge: error" in capsys.readouterr().err


def test_chat_cli_uses_the_chat_template(trained, tmp_path, capsys, monkeypatch):
    from lmforge.cli import main
    from lmforge.model import save_hf_model

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)).eval()
    save_hf_model(model, tmp_path)
    trained.save(tmp_path)
    answers = iter(["你好", "and then?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "6", "--pack"]) == 0
    out = capsys.readouterr().out
    first = [{"role": "user", "content": "你好"}]
    expected = generate(model, trained, trained.apply_chat_template(first, add_generation_prompt=True),
                        SamplingConfig(max_new_tokens=6, temperature=0,
                                       stop_token_ids=[trained.special_tokens["<|im_end|>"],
                                                       trained.special_tokens["<|endoftext|>"]]))
    assert out.startswith("model> " + expected + "\n")
    assert out.count("model> ") == 2


@pytest.mark.slow
def test_compiled_decode_with_static_cache_equals_eager():
    """torch.compile + a static KV cache (tensor position, masked full-cache attention): the same greedy tokens
    as eager for a padded batch and one by one, for RoPE and learned positions; int8 and packed weights compile too."""
    from lmforge.model import pack_for_cpu, quantize_int8

    torch.manual_seed(0)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    for model in (Transformer(preset("tiny-llama")).eval(), Transformer(preset("tiny-gpt2")).eval(),
                  quantize_int8(Transformer(preset("tiny-llama"))), pack_for_cpu(Transformer(preset("tiny-gpt2")))):
        eager = generate_ids(model, PROMPTS, cfg)
        assert generate_ids(model, PROMPTS, cfg, compile=True) == eager
        assert generate_ids(model, [PROMPTS[2]], cfg, compile=True)[0] == eager[2]
