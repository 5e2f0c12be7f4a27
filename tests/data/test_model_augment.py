"""Back-translation and paraphrase augmentation through the model clients: what is sent (the prompts written out here
by hand, the sampling options, the pivot language) and what comes back (cleaned replies, labels kept, sources and
operations tagged, duplicates of the originals dropped, replies cached), against a fake OpenAI server and against
lmforge's engine running a tiny model."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmforge.cli import main
from lmforge.config import ConfigError
from lmforge.data.augment import AugmentConfig, AugmentError, augment_records
from lmforge.infer.client import HTTPClient
from lmforge.synth.augment import ModelAugmenter, clean_reply

# a translation from or into Chinese is asked in Chinese (as finetune --task translate's instruction)
EN_TO_ZH = "将下面的英文翻译成中文。只回复译文。\n\n"
ZH_TO_EN = "将下面的中文翻译成英文。只回复译文。\n\n"
EN_PARA = ("Paraphrase the following text: say the same thing in different words, in the same language and tone. "
           "Reply with the new text only.\n\n")
ZH_PARA = "用不同的说法改写下面这段文字，意思、语气和语言保持不变。只回复改写后的文字。\n\n"
UNCHANGED = "Great phone."  # the fake model gives this one back as it was: a duplicate to drop


class FakeOpenAI(BaseHTTPRequestHandler):
    """Replies by prompt: a "translation" wraps the text in marks a back-translation takes off again (with the
    sample number, so samples differ), a paraphrase says it "in other words"; chat-model wrapping (quotes, a lead-in
    line) around every answer."""

    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen.append({"auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][0]["content"]
        instruction, text = prompt.split("\n\n", 1)
        choices = []
        for k in range(body["n"]):
            if text == UNCHANGED:
                reply = text
            elif instruction.startswith("将下面的英文翻译成中文"):
                reply = f"“〔{text}｜{k}〕”" if "〔" not in text else "Here is the translation:\n" + text.strip("〔〕")
            elif instruction.startswith("将下面的中文翻译成英文") and "〔" in text:
                reply = "以下是译文：\n" + re.sub(r"^〔(.*)｜(\d)〕$", r"\1 (take \2)", text)
            elif instruction.startswith(("将下面的中文翻译成英文", "Translate the following English text into French")):
                reply = f"〔{text}｜{k}〕"
            elif instruction.startswith("Translate the following French text into English"):
                reply = re.sub(r"^〔(.*)｜(\d)〕$", r"\1 (via French \2)", text)
            elif instruction.startswith("Paraphrase"):
                reply = f'"In other words {k}: {text}"'
            elif instruction.startswith("用不同的说法"):
                reply = f"换句话说{k}：{text}"
            else:
                reply = "?"
            choices.append({"index": k, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"})
        out = json.dumps({"choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 5}},
                         ensure_ascii=False).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture()
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeOpenAI.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


RECORDS = [("r.jsonl:1", {"text": "The battery lasts two days.", "label": "pos"}),
           ("r.jsonl:2", {"text": "屏幕太暗了。", "label": "neg"}),
           ("r.jsonl:3", {"text": UNCHANGED, "label": "pos"})]


def _prompts() -> list[str]:
    return [s["body"]["messages"][0]["content"] for s in FakeOpenAI.seen]


def test_clean_reply_takes_off_what_chat_models_wrap_around_an_answer():
    assert clean_reply('  "It works."  ') == "It works."
    assert clean_reply("Here is the paraphrase:\nIt works.") == "It works."
    assert clean_reply("以下是译文：\n它能用。") == "它能用。"
    assert clean_reply("「好」") == "好"
    assert clean_reply('"a" and "b"') == '"a" and "b"'  # not one quoted answer: kept whole
    assert clean_reply("Note: it works.") == "Note: it works."  # a colon inside the answer's own line stays


def test_backtranslation_and_paraphrase_through_an_openai_endpoint(endpoint, tmp_path):
    client = HTTPClient(endpoint, model="m", api_key="k")
    cache = tmp_path / "replies.jsonl"
    cfg = AugmentConfig(ops=("backtranslate", "paraphrase"), per_record=4, seed=3)
    out = list(augment_records(RECORDS, cfg, originals=False, model=ModelAugmenter(client, seed=3, cache=cache)))

    # what is sent: per operation, every record in one batch; backtranslate's two legs, each in the text's language
    prompts = _prompts()
    assert set(prompts) == {
        EN_TO_ZH + "The battery lasts two days.", ZH_TO_EN + "屏幕太暗了。", EN_TO_ZH + UNCHANGED,
        ZH_TO_EN + "〔The battery lasts two days.｜0〕", ZH_TO_EN + "〔The battery lasts two days.｜1〕",
        EN_TO_ZH + "〔屏幕太暗了。｜0〕", EN_TO_ZH + "〔屏幕太暗了。｜1〕", ZH_TO_EN + UNCHANGED,
        EN_PARA + "The battery lasts two days.", ZH_PARA + "屏幕太暗了。", EN_PARA + UNCHANGED}
    first = {p: s["body"] for p, s in zip(prompts, FakeOpenAI.seen)}
    assert first[EN_TO_ZH + "The battery lasts two days."]["n"] == 2  # 4 per record: 2 of each operation
    assert first[ZH_TO_EN + "〔The battery lasts two days.｜0〕"]["n"] == 1  # the way back: one per translation
    body = FakeOpenAI.seen[0]["body"]
    assert (body["model"], body["temperature"], body["top_p"], body["seed"]) == ("m", 0.7, 0.95, 3)
    assert FakeOpenAI.seen[0]["auth"] == "Bearer k"

    # what comes back: cleaned, labelled as the source, tagged with source and operation; the unchanged one dropped
    got = {(r["augmented"]["source"], r["augmented"]["op"], r["text"], r["label"]) for r in out}
    assert got == {
        ("r.jsonl:1", "backtranslate", "The battery lasts two days. (take 0)", "pos"),
        ("r.jsonl:1", "backtranslate", "The battery lasts two days. (take 1)", "pos"),
        ("r.jsonl:1", "paraphrase", "In other words 0: The battery lasts two days.", "pos"),
        ("r.jsonl:1", "paraphrase", "In other words 1: The battery lasts two days.", "pos"),
        ("r.jsonl:2", "backtranslate", "屏幕太暗了。｜0", "neg"),
        ("r.jsonl:2", "backtranslate", "屏幕太暗了。｜1", "neg"),
        ("r.jsonl:2", "paraphrase", "换句话说0：屏幕太暗了。", "neg"),
        ("r.jsonl:2", "paraphrase", "换句话说1：屏幕太暗了。", "neg")}
    assert [r["augmented"]["source"] for r in out] == sorted(r["augmented"]["source"] for r in out)  # record order
    st = augment_records.stats  # Great phone.'s two equal translations go back as one request
    assert st["new"] == 8 and st["model_requests"] == len(FakeOpenAI.seen) == 11
    assert st["duplicates"] == 4  # Great phone.'s 2 back-translations and 2 paraphrases: equal to the original

    # the reply cache: the same run again asks nothing; another seed asks again
    asked = len(FakeOpenAI.seen)
    again = list(augment_records(RECORDS, cfg, originals=False, model=ModelAugmenter(client, seed=3, cache=cache)))
    assert again == out and len(FakeOpenAI.seen) == asked and augment_records.stats["model_requests"] == 0
    assert len(cache.read_text().splitlines()) == asked
    list(augment_records(RECORDS, AugmentConfig(ops=("paraphrase",), per_record=1, seed=4), originals=False,
                         model=ModelAugmenter(client, seed=4, cache=cache)))
    assert len(FakeOpenAI.seen) == asked + 3


def test_pivot_language_and_refusals(endpoint, tmp_path):
    client = HTTPClient(endpoint, model="m")
    cfg = AugmentConfig(ops=("backtranslate",), per_record=1)
    out = list(augment_records(RECORDS[:1], cfg, originals=False, model=ModelAugmenter(client, pivot="fr")))
    assert _prompts() == [
        "Translate the following English text into French. Reply with the translation only.\n\n"
        "The battery lasts two days.",
        "Translate the following French text into English. Reply with the translation only.\n\n"
        "〔The battery lasts two days.｜0〕"]
    assert [r["text"] for r in out] == ["The battery lasts two days. (via French 0)"]

    with pytest.raises(AugmentError, match="entity spans cannot be kept"):  # NER: spans cannot survive a rewrite
        AugmentConfig(ops=("swap", "paraphrase"), tokens_field="tokens")
    with pytest.raises(AugmentError, match="need a model"):
        list(augment_records(RECORDS, AugmentConfig(ops=("paraphrase",))))
    with pytest.raises(AugmentError, match="pivot: unknown language code 'xx'"):
        list(augment_records(RECORDS[:1], AugmentConfig(ops=("backtranslate",)), model=ModelAugmenter(client, pivot="xx")))


def test_cli_classify_and_finetune_augment_through_the_endpoint(endpoint, tmp_path, capsys):
    from lmforge.classify.data import Labelled, augment_examples
    from lmforge.classify.run import ClassifyConfig, _check
    from lmforge.finetune.conversations import Conversation
    from lmforge.finetune.run import augment_conversations

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in RECORDS), encoding="utf-8")
    out = tmp_path / "aug.jsonl"
    args = ["data", "augment", "--input", str(data), "--output", str(out), "--ops", "paraphrase", "--per-record", "1",
            "--endpoint", endpoint, "--served-model", "m"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows[:3]] == [r["text"] for _, r in RECORDS]  # the originals first
    assert {(r["text"], r["label"], r["augmented"]["op"]) for r in rows[3:]} == {
        ("In other words 0: The battery lasts two days.", "pos", "paraphrase"), ("换句话说0：屏幕太暗了。", "neg", "paraphrase")}
    assert "3 model requests" in capsys.readouterr().out
    assert main(args + ["--json"]) == 0  # the rerun: every reply from OUTPUT.replies.jsonl
    assert json.loads(capsys.readouterr().out)["model_requests"] == 0
    assert (tmp_path / "aug.jsonl.replies.jsonl").exists() and len(FakeOpenAI.seen) == 3
    assert main(["data", "augment", "--input", str(data), "--output", str(out), "--task", "token", "--ops",
                 "paraphrase", "--endpoint", endpoint]) == 2
    assert "entity spans cannot be kept" in capsys.readouterr().err

    # classify train --augment: labels kept, the replies cached in the run directory
    cfg = ClassifyConfig(model="m", data=str(data), out=str(tmp_path / "clf"), augment=["paraphrase"],
                         augment_endpoint=endpoint, augment_served_model="m")
    _check(cfg)
    new = augment_examples(cfg, [Labelled("屏幕太暗了。", ["neg"], "reviews.jsonl:2")])
    assert [(e.text, e.labels, e.where) for e in new] == [("换句话说0：屏幕太暗了。", ["neg"], "reviews.jsonl:2 (paraphrase)")]
    assert (tmp_path / "clf" / "augment_replies.jsonl").exists()
    with pytest.raises(ConfigError, match="needs a model"):
        _check(ClassifyConfig(model="m", data=str(data), augment=["paraphrase"]))
    with pytest.raises(ConfigError, match="entity spans cannot be kept"):
        _check(ClassifyConfig(model="m", data=str(data), task="token", augment=["backtranslate"],
                              augment_endpoint=endpoint))
    with pytest.raises(ConfigError, match="only backtranslate and paraphrase use a model"):
        _check(ClassifyConfig(model="m", data=str(data), augment=["swap"], augment_endpoint=endpoint))

    # finetune --augment: the last user turn rewritten, the reply the source's
    conv = Conversation([{"role": "user", "content": "屏幕太暗了。"}, {"role": "assistant", "content": "差评"}], None,
                        None, "chat.jsonl:1")
    got = augment_conversations([conv], ["paraphrase"], model=ModelAugmenter(HTTPClient(endpoint, model="m")))
    assert [m["content"] for m in got[1].messages] == ["换句话说0：屏幕太暗了。", "差评"]
    assert got[1].where == "chat.jsonl:1 (paraphrase)"


def test_engine_writes_the_variants_from_the_documented_prompts(trained_dir, tmp_path):
    """lmforge's engine running a tiny random model in the process: the prompts it is given are the documented
    ones (the way back built from the cleaned translation), with the documented sampling, and each new text is a
    cleaned reply of the engine."""
    from lmforge.infer.client import EngineClient, ModelClient
    from tests.models import tiny_llama

    class Recording(ModelClient):
        def __init__(self, inner):
            self.inner, self.name, self.calls = inner, inner.name, []

        def chat(self, conversations, sampling=None, n=1, tools=None):
            out = self.inner.chat(conversations, sampling, n, tools)
            self.calls += [(c[0]["content"], sampling, n, [x.text for x in o]) for c, o in zip(conversations, out)]
            return out

    # --no-pack: torch's matmul, so the test never waits for the CPU kernels to build
    client = Recording(EngineClient(str(tiny_llama(tmp_path / "tiny", trained_dir)), pack=False))
    texts = ["The screen is too dark.", "电池很耐用。"]
    records = [(f"in.jsonl:{i + 1}", {"text": t, "label": "x"}) for i, t in enumerate(texts)]
    cfg = AugmentConfig(ops=("paraphrase", "backtranslate"), per_record=2, seed=5)
    out = list(augment_records(records, cfg, originals=False, model=ModelAugmenter(client, seed=5, max_tokens=12)))

    sent = {prompt: replies for prompt, _, _, replies in client.calls}
    assert {(s.temperature, s.top_p, s.max_tokens, s.seed, n) for _, s, n, _ in client.calls} == {
        (0.7, 0.95, 12, 5, 1)}
    # the new texts: each record's cleaned replies, minus those equal to an original or to an earlier record's new
    # text (a random model says much the same whatever it is asked)
    seen, expected, candidates = {" ".join(t.split()) for t in texts}, set(), []
    for i, (text, para, forth, back) in enumerate([(texts[0], EN_PARA, EN_TO_ZH, ZH_TO_EN),
                                                   (texts[1], ZH_PARA, ZH_TO_EN, EN_TO_ZH)]):
        pivot = clean_reply(sent[forth + text][0])
        assert pivot, "the tiny model wrote nothing to translate back"
        made = {("paraphrase", clean_reply(sent[para + text][0])), ("backtranslate", clean_reply(sent[back + pivot][0]))}
        candidates += [(f"in.jsonl:{i + 1}", op, t) for op, t in made]
        fresh = {(f"in.jsonl:{i + 1}", t) for _, t in made if t and " ".join(t.split()) not in seen}
        expected |= fresh
        seen |= {" ".join(t.split()) for _, t in fresh}
    assert len(sent) == 6  # per record: a paraphrase and the two legs of a back-translation
    assert {(r["augmented"]["source"], r["text"]) for r in out} == expected
    assert {(r["augmented"]["source"], r["augmented"]["op"], r["text"]) for r in out} <= set(candidates)
    assert len(out) == len(expected) and all(r["label"] == "x" for r in out)


def test_pipeline_step_refuses_the_model_operations():
    """A pipeline step runs no model (the data layer sits below the model clients): the step says where to go."""
    from lmforge.data.augment import AugmentStep

    with pytest.raises(AugmentError, match="paraphrase is written by a model.*lmforge data augment --ops paraphrase"):
        AugmentStep(ops=["swap", "paraphrase"]).setup()
