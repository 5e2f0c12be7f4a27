"""Every instruction-data format on hand-written records (English and Chinese), LLaMA-Factory's dataset_info.json
as documented in its data/README.md, and bad records named by file:line and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import ConfigError
from lmforge.data.sources import CorpusError, RejectLog
from lmforge.finetune.conversations import DataFormatError, load_conversations


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "把这句话翻译成英文", "input": "今天天气很好。", "output": "The weather is nice today."},
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "system": "Answer briefly.",
     "history": [["Hi!", "Hello! How can I help?"]]},
]


def test_alpaca(tmp_path):
    convs = load_conversations(str(_jsonl(tmp_path / "a.jsonl", ALPACA)))
    assert convs[0].messages == [{"role": "user", "content": "把这句话翻译成英文\n今天天气很好。"},
                                 {"role": "assistant", "content": "The weather is nice today."}]
    assert [m["role"] for m in convs[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[1].messages[3]["content"] == "Name the capital of France."  # an empty input adds nothing
    assert convs[0].where.endswith("a.jsonl:1")


def test_sharegpt_with_tools_and_openai_messages(tmp_path):
    share = {"conversations": [
        {"from": "human", "value": "北京现在几度？"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "北京"}},
                                                     ensure_ascii=False)},
        {"from": "observation", "value": "{\"temp_c\": 21}"},
        {"from": "gpt", "value": "北京现在21度。"}],
        "system": "你是天气助手。", "tools": json.dumps([{"name": "weather", "description": "current weather",
                                                       "parameters": {"type": "object"}}])}
    convs = load_conversations(str(_jsonl(tmp_path / "s.jsonl", [share])))
    m = convs[0].messages
    assert [x["role"] for x in m] == ["system", "user", "assistant", "tool", "assistant"]
    assert m[2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "北京"}}
    assert convs[0].tools[0]["function"]["name"] == "weather"
    openai = {"messages": [{"role": "developer", "content": "Be terse."},
                           {"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"id": "c1", "type": "function", "function": {"name": "calc",
                                                                            "arguments": "{\"expr\": \"2+2\"}"}}]},
                           {"role": "tool", "tool_call_id": "c1", "content": "4"},
                           {"role": "assistant", "content": "4"}]}
    convs = load_conversations(str(_jsonl(tmp_path / "o.jsonl", [openai])))
    m = convs[0].messages
    assert m[0] == {"role": "system", "content": "Be terse."} and m[1]["content"] == "2+2?"
    assert m[2]["tool_calls"][0]["function"]["arguments"] == {"expr": "2+2"} and m[3]["tool_call_id"] == "c1"


def test_pairs_csv_tsv_parquet_json_and_text(tmp_path):
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "note"])
        w.writerow(["什么是机器学习？", "让计算机从数据中学习规律的方法。", "x"])
        w.writerow(["What is 2+2?", "4", ""])
    convs = load_conversations(str(tmp_path / "qa.csv"), "pairs", {"prompt": "question", "response": "answer"})
    assert convs[0].messages[1]["content"] == "让计算机从数据中学习规律的方法。" and convs[1].where.endswith("qa.csv:3")
    (tmp_path / "qa.tsv").write_text("context\tresponse\nhello\tworld\n", encoding="utf-8")
    assert load_conversations(str(tmp_path / "qa.tsv"))[0].messages[0]["content"] == "hello"  # auto: pairs
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ALPACA[:1]), tmp_path / "a.parquet")
    assert load_conversations(str(tmp_path / "a.parquet"))[0].messages[1]["content"] == "The weather is nice today."
    (tmp_path / "a.json").write_text(json.dumps(ALPACA, ensure_ascii=False), encoding="utf-8")
    convs = load_conversations(str(tmp_path / "a.json"))
    assert len(convs) == 2 and convs[1].where.endswith("a.json:record 2")
    (tmp_path / "book.txt").write_text("第一章。很久以前……", encoding="utf-8")
    assert load_conversations(str(tmp_path / "book.txt"))[0].text == "第一章。很久以前……"


def test_llama_factory_dataset_info_loads_as_it_ships(tmp_path):
    """Entries written as LLaMA-Factory's data/README.md documents them."""
    _jsonl(tmp_path / "alpaca_zh_demo.jsonl", [{"instruction": "识别并解释给定列表中的两个科学理论", "input": "细胞理论和日心说",
                                               "output": "细胞理论是生物学的基础理论之一……", "system": "",
                                               "history": []}])
    (tmp_path / "glaive_toolcall_demo.json").write_text(json.dumps([{
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        "tools": "[]"}]), encoding="utf-8")
    _jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello"}]}])
    _jsonl(tmp_path / "dpo.jsonl", [{"instruction": "x", "chosen": "a", "rejected": "b"}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.jsonl"},
        "glaive_toolcall_demo": {"file_name": "glaive_toolcall_demo.json", "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "tools": "tools"}},
        "openai_style": {"file_name": "chats.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                  "assistant_tag": "assistant"}},
        "dpo_demo": {"file_name": "dpo.jsonl", "ranking": True,
                     "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
        "remote": {"hf_hub_url": "llamafactory/alpaca_en"}}, ensure_ascii=False), encoding="utf-8")
    info = tmp_path / "dataset_info.json"
    first = load_conversations(f"{info}#alpaca_zh_demo")[0].messages[0]["content"]
    assert first == "识别并解释给定列表中的两个科学理论\n细胞理论和日心说"
    assert load_conversations(f"{info}#glaive_toolcall_demo")[0].messages[1]["content"] == "Hello"
    assert load_conversations(f"{info}#openai_style")[0].messages[0]["role"] == "user"
    with pytest.raises(ConfigError, match="ranking"):
        load_conversations(f"{info}#dpo_demo")
    with pytest.raises(ConfigError, match="remote"):
        load_conversations(f"{info}#remote")
    with pytest.raises(ConfigError, match="did you mean 'alpaca_zh_demo'"):
        load_conversations(f"{info}#alpaca_zh_dem")


LLAMA_FACTORY = Path(__file__).resolve().parents[1] / "fixtures" / "llamafactory" / "dataset_info.json"


def test_llama_factory_registry_as_it_ships(caplog):
    """LLaMA-Factory 0.9.5's own dataset_info.json (tests/fixtures/llamafactory) and excerpts of its demo sets: every
    local entry loads as its kind, or is refused saying why; remote entries say to download."""
    from lmforge.finetune.preference import load_pairs

    registry = json.loads(LLAMA_FACTORY.read_text(encoding="utf-8"))
    local = {n for n, e in registry.items() if "file_name" in e and (LLAMA_FACTORY.parent / e["file_name"]).exists()}
    assert {"alpaca_en_demo", "alpaca_zh_demo", "identity", "glaive_toolcall_en_demo", "glaive_toolcall_zh_demo",
            "dpo_en_demo", "dpo_zh_demo", "kto_en_demo", "mllm_demo", "c4_demo", "wiki_demo"} <= local
    zh = load_conversations(f"{LLAMA_FACTORY}#alpaca_zh_demo")
    assert zh[0].messages[0] == {"role": "user", "content": "识别并解释给定列表中的两个科学理论：细胞理论和日心说。"}
    assert zh[0].messages[1]["content"].startswith("细胞理论是生物科学的一个理论")
    for name in ("glaive_toolcall_en_demo", "glaive_toolcall_zh_demo"):
        convs = load_conversations(f"{LLAMA_FACTORY}#{name}")
        calls = [m["tool_calls"][0]["function"] for c in convs for m in c.messages if m.get("tool_calls")]
        assert len(calls) >= 2 and isinstance(calls[0]["arguments"], dict)  # function_call -> an OpenAI tool call
        assert convs[0].tools and convs[0].tools[0]["type"] == "function"
        assert any(m["role"] == "tool" for m in convs[0].messages)  # observation -> a tool turn
    assert len(load_pairs(f"{LLAMA_FACTORY}#dpo_zh_demo")) == 3
    with pytest.raises(ConfigError, match="ranking"):
        load_conversations(f"{LLAMA_FACTORY}#dpo_en_demo")
    # KTO: the desirable replies only, the others counted
    kto = load_conversations(f"{LLAMA_FACTORY}#kto_en_demo")
    assert len(kto) == 2 and "2 examples are undesirable replies (label false)" in caplog.text
    # pretraining entries (columns: {prompt: text}): plain text, a .txt file one document per line
    c4 = load_conversations(f"{LLAMA_FACTORY}#c4_demo")
    assert len(c4) == 3 and c4[0].text.startswith("Don’t think you need all the bells and whistles?")
    wiki = load_conversations(f"{LLAMA_FACTORY}#wiki_demo")
    assert len(wiki) == 3 and wiki[0].text.startswith("Anarchism is a political philosophy")
    assert wiki[2].where.endswith("wiki_demo.txt:3")
    with pytest.raises(ConfigError, match=r"a multimodal dataset \(its images column\)"):
        load_conversations(f"{LLAMA_FACTORY}#mllm_demo")
    with pytest.raises(ConfigError, match="remote"):
        load_conversations(f"{LLAMA_FACTORY}#alpaca_gpt4_zh")
    assert [len(load_conversations(f"{LLAMA_FACTORY}#{n}")) for n in ("alpaca_en_demo", "identity")] == [3, 3]


def test_long_plain_text_is_cut_into_windows_not_truncated(real_tokenizers):
    """Continued pretraining on a document longer than max_length trains every token once, window by window."""
    from lmforge.finetune.conversations import Conversation
    from lmforge.finetune.sft import build_examples
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(real_tokenizers["qwen2.5-instruct"])
    text = "无政府主义是一种政治哲学，怀疑权威。Anarchism is a political philosophy. " * 6
    ids = tok.encode(text) + [0]
    ex = build_examples(tok, "", [Conversation(text=text)], max_length=16, eos_id=0)
    assert [len(x) for x in ex.input_ids] == [16] * ((len(ids) - 1) // 16) + [(len(ids) - 1) % 16]
    assert np.concatenate(ex.input_ids).tolist() == ids[:-1]
    assert np.concatenate(ex.labels).tolist() == ids[1:]
    assert ex.stats["truncated"] == 0 and ex.stats["trained_tokens"] == len(ids) - 1


BAD = [
    ('{"instruction": "q", "output": "a"}', None),
    ('{"instruction": "q"}', "field 'output' is missing"),
    ('{"instruction": "q", "output": 42}', "field 'output' is not a string (int)"),
    ('{"instruction": "  ", "output": "a"}', "field 'instruction' is empty"),
    ('{"instruction": "q", "output": "a", "history": [["only one"]]}', "'history[0]' is not a [user, assistant] pair"),
    ('{"instruction": "q", "output": "a"', "malformed JSON"),
]


def test_bad_records_fail_with_file_line_and_field_or_go_to_rejects(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line for line, _ in BAD) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: field 'output' is missing"):
        load_conversations(str(path), "alpaca")
    rejects = RejectLog()
    convs = load_conversations(str(path), "alpaca", on_bad=rejects)
    assert len(convs) == 1
    reasons = [r["reason"] for r in rejects.items]
    for (_, want), got in zip(BAD[1:], reasons):
        assert want in got
    assert [r["where"].rsplit(":", 1)[1] for r in rejects.items] == ["2", "3", "4", "5", "6"]
    orders = [{"conversations": [{"from": "gpt", "value": "a"}]},
              {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                                 {"from": "gpt", "value": "a"}]},
              {"conversations": [{"from": "human", "value": "q"}]},
              {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
              {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}]
    rejects = RejectLog()
    with pytest.raises(CorpusError, match="no valid examples"):
        load_conversations(str(_jsonl(tmp_path / "o.jsonl", orders)), "sharegpt", on_bad=rejects)
    got = [r["reason"] for r in rejects.items]
    assert "starts with a 'assistant' turn" in got[0] and "two user/user turns in a row" in got[1]
    assert "ends with a 'user' turn" in got[2] and "has role 'bot'" in got[3] and "empty assistant turn" in got[4]


def test_a_gbk_csv_reads_with_encoding_auto(tmp_path):
    rows = "question,answer\n长城有多长？,长城全长两万多公里。\n"
    (tmp_path / "zh.csv").write_bytes(rows.encode("gb18030"))
    with pytest.raises(CorpusError, match="invalid UTF-8"):
        load_conversations(str(tmp_path / "zh.csv"))
    convs = load_conversations(str(tmp_path / "zh.csv"), encoding="auto")
    assert convs[0].messages[1]["content"] == "长城全长两万多公里。"
