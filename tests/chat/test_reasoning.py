"""Reasoning blocks on the real templates of reasoning models (Qwen3, DeepSeek-R1 distills, SmolLM3): the markers
found, a reply split back into the reasoning and answer the template rendered, and the streamed split equal to the
whole one wherever the reply is cut."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge.chat.reasoning import (
    ReasoningMarkers,
    ReasoningStream,
    opens_reasoning,
    reasoning_markers,
    split_reasoning,
)
from lmforge.chat.render import render_chat
from lmforge.chat.templates import BUILTIN_TEMPLATES, pick_template
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.formats import read_tokenizer_config

THINK = ReasoningMarkers("<think>", "</think>")
PAIRS = [("add them: 2 + 3", "5"), ("先算 2+3，\n再检查一遍。", "答案是 5。"), ("line one\n\nline two", "a\n\nb  "),
         ("", "just the answer")]


def _template(real_tokenizers, name):
    folder = real_tokenizers[name]
    return pick_template(read_tokenizer_config(folder).get("chat_template"))


def _streamed(text: str, cuts, markers=THINK, inside=False) -> tuple[str | None, str]:
    """The split of `text` fed in pieces at `cuts`."""
    stream, reasoning, content, at = ReasoningStream(markers, inside), "", "", 0
    for cut in list(cuts) + [len(text)]:
        r, c = stream.push(text[at:cut])
        reasoning, content, at = reasoning + r, content + c, cut
    r, c = stream.flush()
    return (reasoning + r if stream.has_reasoning else None), content + c


def _every_cut_agrees(text: str, inside=False, markers=THINK) -> None:
    whole = split_reasoning(text, markers, inside)
    want = (whole.reasoning, whole.content)
    cut_sets = [[]] + [[i] for i in range(len(text) + 1)] + [list(range(1, len(text)))]
    cut_sets += [[i, j] for i in range(0, len(text) + 1, 3) for j in range(i, len(text) + 1, 2)]
    for cuts in cut_sets:
        assert _streamed(text, cuts, markers, inside) == want, (text, cuts)


def test_markers_of_real_templates(real_tokenizers):
    # Qwen3 renders reasoning_content itself: the markers come from its own render
    assert reasoning_markers(_template(real_tokenizers, "qwen3")) == THINK
    # DeepSeek-R1 and SmolLM3 never render reasoning_content: the <think> pair they write elsewhere
    for name in ("deepseek-r1-distill-qwen-1.5b-template-only", "smollm3-3b-template-only"):
        assert reasoning_markers(_template(real_tokenizers, name)) == THINK, name
    for name in ("qwen2.5-instruct", "phi-3-mini-instruct", "chatglm3-6b", "gemma-3-it-template-only"):
        assert reasoning_markers(_template(real_tokenizers, name)) is None, name
    assert reasoning_markers(BUILTIN_TEMPLATES["chatml"]) is None and reasoning_markers(None) is None
    # a template's own markers, found by rendering an assistant turn's reasoning_content
    own = ("{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>{% if m.reasoning_content %}"
           "<|begin_of_thought|>\n{{ m.reasoning_content }}\n<|end_of_thought|>\n{% endif %}{{ m.content }}"
           "{% else %}<|user|>{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
           "{% endif %}")
    assert reasoning_markers(own) == ReasoningMarkers("<|begin_of_thought|>", "<|end_of_thought|>")


@pytest.mark.parametrize("reasoning,answer", PAIRS)
def test_qwen3_reply_splits_back_into_what_its_template_rendered(real_tokenizers, reasoning, answer):
    """Qwen3 renders an assistant turn's reasoning_content as "<think>\\n...\\n</think>\\n\\n" + answer: the reply the
    model writes. Split back, it gives the same reasoning and answer; and the template itself, parsing that reply
    as the content of a turn (its own split at </think>), renders the same conversation."""
    qwen3 = _template(real_tokenizers, "qwen3")
    user = {"role": "user", "content": "2+3=?"}
    prompt = render_chat(qwen3, [user], add_generation_prompt=True)
    whole = render_chat(qwen3, [user, {"role": "assistant", "content": answer, "reasoning_content": reasoning}])
    assert whole.startswith(prompt) and whole.endswith("<|im_end|>\n")
    reply = whole[len(prompt):-len("<|im_end|>\n")]
    assert not opens_reasoning(prompt, THINK)
    split = split_reasoning(reply, THINK)
    assert (split.reasoning, split.content) == (reasoning.strip("\n"), answer.lstrip("\n"))
    assert render_chat(qwen3, [user, {"role": "assistant", "content": reply}]) == whole
    _every_cut_agrees(reply)


def test_qwen3_replies_as_its_template_parses_them(real_tokenizers):
    """Any reply that opens with the block, or has none: our split renders the same turn as Qwen3's own parsing of
    the reply (its template takes a content with </think> apart itself)."""
    qwen3 = _template(real_tokenizers, "qwen3")
    user = {"role": "user", "content": "hi"}
    for reply in ("<think>\nx\n</think>\n\ny", "<think>\n\n</think>\n\nno thoughts", "plain answer, no block",
                  "<think>a</think>b", "<think>\n多行\n推理\n</think>\n\n\n答", "\n<think>\nr\n</think>\n\nc"):
        split = split_reasoning(reply, THINK)
        ours = {"role": "assistant", "content": split.content}
        if split.reasoning is not None:
            ours["reasoning_content"] = split.reasoning
        assert render_chat(qwen3, [user, ours]) == render_chat(qwen3, [user, {"role": "assistant", "content": reply}])
        _every_cut_agrees(reply)


@pytest.mark.parametrize("reasoning,answer", PAIRS)
def test_deepseek_r1_prompt_opens_the_block(real_tokenizers, reasoning, answer):
    """DeepSeek-R1's generation prompt ends with "<think>\\n": the reply is reasoning up to </think>, then the answer
    (what the template keeps of a turn: the text after </think>)."""
    r1 = _template(real_tokenizers, "deepseek-r1-distill-qwen-1.5b-template-only")
    prompt = render_chat(r1, [{"role": "user", "content": "2+3=?"}], add_generation_prompt=True,
                         bos_token="<｜begin▁of▁sentence｜>")
    assert prompt.endswith("<｜Assistant｜><think>\n") and opens_reasoning(prompt, THINK)
    reply = reasoning + "\n</think>\n\n" + answer
    split = split_reasoning(reply, THINK, inside=True)
    assert split.reasoning == reasoning.strip("\n") and split.content == reply.split("</think>")[-1].lstrip("\n")
    _every_cut_agrees(reply, inside=True)
    # cut off before </think> (max_tokens): all reasoning
    assert split_reasoning(reasoning, THINK, inside=True).content == ""
    _every_cut_agrees(reasoning + "\n</thi", inside=True)


def test_streaming_token_by_token_through_the_qwen3_tokenizer(real_tokenizers):
    """The reply as Qwen3's tokenizer encodes it (<think> and </think> are single added tokens), decoded as the
    engine streams it: the pieces split as the whole does."""
    from lmforge.infer.detokenize import IncrementalDetokenizer

    tok = load_tokenizer(real_tokenizers["qwen3"])
    reply = "<think>\n先算 2+3，再检查。\n</think>\n\n答案是 5 🙂"
    ids, _ = tok.encode_template_text(reply)
    assert tok.token_to_id("<think>") in ids and tok.token_to_id("</think>") in ids
    detok, stream, reasoning, content = IncrementalDetokenizer(tok), ReasoningStream(THINK), "", ""
    for i in ids:
        r, c = stream.push(detok.push(i))
        reasoning, content = reasoning + r, content + c
    r, c = stream.push(detok.flush())
    r2, c2 = stream.flush()
    assert (reasoning + r + r2, content + c + c2) == ("先算 2+3，再检查。", "答案是 5 🙂")


@given(st.lists(st.sampled_from(["<think>", "</think>", "<th", "ink>", "</", "think", ">", "\n", "\n\n", " ", "a",
                                 "中", "<", "/"]), max_size=12),
       st.lists(st.integers(0, 40), max_size=4), st.booleans())
def test_streamed_split_equals_the_whole_split_for_any_text_and_cuts(parts, cuts, inside):
    text = "".join(parts)
    whole = split_reasoning(text, THINK, inside)
    cuts = sorted(min(c, len(text)) for c in cuts)
    assert _streamed(text, cuts, THINK, inside) == (whole.reasoning, whole.content)
