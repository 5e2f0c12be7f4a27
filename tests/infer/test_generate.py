"""Generation: cache == no cache == transformers.generate (greedy); batched == one by one; sampling filters."""

from __future__ import annotations

import pytest
import torch

from lmforge.chat.templates import apply_chat_template
from lmforge.infer import (
    ChatSession,
    IncrementalDetokenizer,
    Request,
    SamplingConfig,
    generate,
    generate_ids,
    generate_stream,
    process_logits,
    stream,
)
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

    from lmforge.model import pack_for_cpu, quantize_int8

    assert main(["generate", "--model", str(tmp_path), "--prompt", "def main():", "--temperature", "0",
                 "--max-new-tokens", "10", "--quantize", "int8", "--compile"]) == 0
    int8 = pack_for_cpu(quantize_int8(copy.deepcopy(model)))  # float32: the int8 panels, as `generate` loads it
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
    expected = generate(model, trained, apply_chat_template(trained, first, add_generation_prompt=True, tokenize=True),
                        SamplingConfig(max_new_tokens=6, temperature=0,
                                       stop_token_ids=[trained.special_tokens["<|im_end|>"],
                                                       trained.special_tokens["<|endoftext|>"]]))
    assert out.startswith("model> " + expected + "\n")
    assert out.count("model> ") == 2
    # another template than the model's own (the one a fine-tuned model learned) is named in a warning
    answers = iter([""])
    assert main(["chat", "--model", str(tmp_path), "--chat-template", "llama-3"]) == 0
    assert "is not the model's own chat template" in capsys.readouterr().err
    answers = iter([""])  # the patched input reads this name
    assert main(["chat", "--model", str(tmp_path), "--chat-template", "no-such"]) == 2
    assert "neither a built-in" in capsys.readouterr().err


def _inputs(*lines: str):
    """A stand-in for input(): the lines, one per call."""
    answers = iter(lines)
    return lambda prompt="": next(answers)


def test_chat_cli_shows_a_reasoning_models_thinking_dimmed(trained, real_tokenizers, tmp_path, capsys, monkeypatch):
    """DeepSeek-R1's real template opens a <think> block in the prompt: what the model writes is its thinking, shown
    dimmed on a terminal (ANSI dim) and behind a "(thinking)" prefix elsewhere; the text is the engine's own."""
    import io
    import json

    from lmforge.chat.reasoning import ReasoningMarkers, split_reasoning
    from lmforge.chat.render import encode_chat
    from lmforge.cli import main
    from lmforge.model import save_hf_model

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)).eval()
    save_hf_model(model, tmp_path)
    trained.save(tmp_path)
    r1 = json.loads((real_tokenizers["deepseek-r1-distill-qwen-1.5b-template-only"] / "tokenizer_config.json")
                    .read_text())["chat_template"]
    (tmp_path / "r1.jinja").write_text(r1)
    prompt = encode_chat(trained, r1, [{"role": "user", "content": "你好"}], add_generation_prompt=True).ids
    alone = generate(model, trained, prompt, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3,
                                                            stop_token_ids=[trained.special_tokens["<|endoftext|>"]]))
    split = split_reasoning(alone, ReasoningMarkers(), inside=True)
    assert split.reasoning and split.content == ""  # the random model's reply: all thinking
    flags = ["chat", "--model", str(tmp_path), "--template", str(tmp_path / "r1.jinja"), "--temperature", "1",
             "--seed", "3", "--max-new-tokens", "8"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for tty, shown in ((True, "\033[2m" + split.reasoning + "\033[0m\n"), (False, "(thinking) " + split.reasoning + "\n")):
        monkeypatch.setattr("builtins.input", _inputs("你好", ""))
        out = Terminal() if tty else io.StringIO()
        monkeypatch.setattr("sys.stdout", out)
        assert main(flags) == 0
        assert out.getvalue() == "model> " + shown
    # the printer on a reply with an answer after the thinking: the answer on its own line, not dimmed
    from lmforge.infer.cli import ReplyPrinter

    out = Terminal()
    printer = ReplyPrinter(out, ReasoningMarkers(), inside=False)
    for piece in ("<thi", "nk>\nfirst", " this\n</th", "ink>\n\nthe ", "answer"):
        printer.write(piece)
    printer.close()
    assert out.getvalue() == "\033[2mfirst this\033[0m\nthe answer\n"
    plain = ReplyPrinter(out := io.StringIO(), None)
    plain.write("<think>as is</think>")
    plain.close()
    assert out.getvalue() == "<think>as is</think>\n"  # no reasoning blocks in the template: the text as it comes


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


def test_each_request_keeps_its_own_sampling_in_one_batch():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=300)).eval()
    configs = [SamplingConfig(max_new_tokens=10, temperature=0),
               SamplingConfig(max_new_tokens=14, temperature=1.2, top_k=40, seed=3),
               SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=11),
               SamplingConfig(max_new_tokens=9, temperature=1.0, min_p=0.05, seed=3)]
    batched = generate_ids(model, PROMPTS, configs)
    assert batched == [generate_ids(model, [p], c)[0] for p, c in zip(PROMPTS, configs)]
    assert [len(x) for x in batched] == [10, 14, 6, 9]
    assert batched[1] != generate_ids(model, [PROMPTS[1]], SamplingConfig(max_new_tokens=14, temperature=1.2, top_k=40,
                                                                          seed=4))[0]


def test_stop_strings_end_a_request_while_the_batch_goes_on(trained):
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)).eval()
    greedy = SamplingConfig(max_new_tokens=30, temperature=0)
    full = generate(model, trained, "def main():", greedy)
    stop = full[6:9]
    requests = [Request("def main():", SamplingConfig(max_new_tokens=30, temperature=0, stop_strings=[stop])),
                Request("class A:", greedy)]
    events = list(generate_stream(model, trained, requests))
    texts = ["".join(e.text for e in events if e.index == i) for i in range(2)]
    assert texts[0] == full[:full.find(stop)]
    assert texts[1] == generate(model, trained, "class A:", greedy)
    last = {e.index: n for n, e in enumerate(events) if e.finish_reason}
    assert events[last[0]].finish_reason == "stop" and events[last[1]].finish_reason in ("length", "stop")
    assert last[0] < last[1]  # the stopped request ended during generation, not after the batch


def test_prompt_text_is_plain_text(trained):
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)).eval()
    cfg = SamplingConfig(max_new_tokens=5, temperature=0)
    prompt = "x<|im_start|>system"
    assert generate(model, trained, prompt, cfg) == generate(model, trained, trained.encode(prompt, disallowed_special=()),
                                                             cfg)


def test_a_prompt_longer_than_the_context_warns():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=300, max_seq_len=16)).eval()
    with pytest.warns(UserWarning, match="exceeds the model's context"):
        events = list(generate_stream(model, _ByteTok(), [Request(list(range(1, 15)),
                                                             SamplingConfig(max_new_tokens=4))]))
    assert events[-1].finish_reason == "length"


class _ByteTok:
    """The least a tokenizer needs for generate_stream: ids are bytes."""

    special_tokens: dict = {}
    eos_token = None

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", "replace")

    def raw_bytes(self, ids):
        return bytes(i % 256 for i in ids)


def test_chat_session_reuses_its_cache_and_trims_old_turns(trained):
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)).eval()
    fed = []
    model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape[1]))
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    session = ChatSession(model, trained, cfg, system="你是一个助手。")
    first = "".join(session.reply("你好"))
    fed.clear()
    second = "".join(session.reply("and then?"))
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    prompt = apply_chat_template(trained, messages, add_generation_prompt=True, tokenize=True)
    assert second == generate(model, trained, prompt, SamplingConfig(max_new_tokens=8, temperature=0,
                                                                      stop_token_ids=session.cfg.stop_token_ids))
    assert fed[0] < len(prompt) // 2  # the prefill fed only what the cache did not hold
    assert session.cfg.stop_token_ids and trained.special_tokens["<|im_end|>"] in session.cfg.stop_token_ids
    # a small context: the oldest exchanges go, the system message stays, the prompt fits
    small = ChatSession(model, trained, cfg, system="sys", context=70)
    for turn in range(6):
        "".join(small.reply(f"message number {turn} with some words"))
    assert small.dropped_turns > 0 and small.messages[0] == {"role": "system", "content": "sys"}
    assert len(apply_chat_template(trained, small.messages, tokenize=True)) <= 70
    with pytest.raises(ValueError, match="does not fit"):
        "".join(small.reply("long " * 200))


def test_chat_session_with_sliding_layers_reuses_what_its_rings_hold(trained):
    """Every layer slides over 40 positions (rings in the session's cache, which the third turn's 74-token prompt
    wraps): each reply equals a forward over the whole conversation at every step (no cache). A turn reuses the
    cached turns where the rings still hold that prefix: a whole entry, or a part of an entry no longer than the
    window (this random model's replies do not encode back to the same ids, so turns share only a part of the last
    one). The third turn shares most with the second's 60-token entry, longer than the window: it reuses the part
    it shares with the first turn's 37-token entry instead."""
    window = 40
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size, sliding_window=window)).eval()
    fed = []
    model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape[1]))
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    session = ChatSession(model, trained, cfg, system="你是一个助手。")
    assert session.scheduler.ring and session.scheduler.cache.k[0].shape[2] == window
    messages = [{"role": "system", "content": "你是一个助手。"}]
    kinds = []
    for user in ("你好", "and then?", "再说一遍"):
        messages.append({"role": "user", "content": user})
        prompt = apply_chat_template(trained, messages, add_generation_prompt=True, tokenize=True)

        def shared(key, prompt=prompt):
            i = 0
            while i < min(len(key), len(prompt) - 1) and key[i] == prompt[i]:
                i += 1
            return i

        entries = list(session.scheduler.prefixes)
        usable = [shared(k) for k in entries if shared(k) == len(k) or len(k) <= window]
        fed.clear()
        reply = "".join(session.reply(user))
        stops = session.cfg.stop_token_ids
        want = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=12, temperature=0, stop_token_ids=stops),
                            use_cache=False)[0]
        assert reply == trained.decode([t for t in want if t not in stops])
        assert fed[0] == len(prompt) - max(usable, default=0)
        # "shorter": a longer shared prefix was there, in an entry whose rings no longer hold where it ends
        longest = max([shared(k) for k in entries], default=0)
        kinds.append("first" if not entries else "reused" if max(usable, default=0) == longest else "shorter")
        messages.append({"role": "assistant", "content": reply})
    assert kinds == ["first", "reused", "shorter"] and len(prompt) > window


def test_cli_replies_fit_a_128_token_context(trained, tmp_path, capsys, monkeypatch):
    """The README's models have a 128-token context and max_new_tokens defaults to 128: `chat` and `generate` clip
    the reply to what the context leaves (said once, on one warning line), and a message too long for the context
    is reported in one line, not sent, and the conversation goes on."""
    from lmforge.cli import main
    from lmforge.model import save_hf_model

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=trained.vocab_size, max_seq_len=128)).eval()
    save_hf_model(model, tmp_path)
    trained.save(tmp_path)
    monkeypatch.setattr("builtins.input", _inputs("你好", "long " * 200, ""))
    assert main(["chat", "--model", str(tmp_path), "--temperature", "0", "--no-pack"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if line.startswith("lmforge: warning:")]
    assert len(warned) == 1 and "128-token context" in warned[0], captured.err
    assert "Traceback" not in captured.err
    assert "(not sent: this message is" in captured.err and "does not fit the 128-token context" in captured.err
    prompt = apply_chat_template(trained, [{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                 tokenize=True)
    stops = [trained.special_tokens["<|im_end|>"], trained.special_tokens["<|endoftext|>"]]
    reply = generate(model, trained, prompt, SamplingConfig(max_new_tokens=128 - len(prompt), temperature=0,
                                                            stop_token_ids=stops))
    assert captured.out.startswith("model> " + reply + "\n")
    # generate: the default 128 new tokens after a prompt, clipped to the context with one warning line
    assert main(["generate", "--model", str(tmp_path), "--prompt", "def main():", "--temperature", "0",
                 "--no-pack"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if line.startswith("lmforge: warning:")]
    assert len(warned) == 1 and "context of 128 tokens" in warned[0], captured.err
    n = len(trained.encode("def main():", disallowed_special=()))
    assert captured.out == generate(model, trained, "def main():", SamplingConfig(max_new_tokens=128 - n,
                                                                                  temperature=0)) + "\n"
