"""Every cleaner and filter rule on hand-built English and Chinese documents."""

from __future__ import annotations

import pytest

from lmforge.config import ConfigError
from lmforge.data.clean import PII, valid_cn_id
from lmforge.data.document import Document
from lmforge.data.step import build_step
from lmforge.text import split_sentences, split_words


def run(name: str, text: str, **params):
    out = build_step(name, params).apply(Document("d", text, {}))
    return out if isinstance(out, str) else out.text


def meta(name: str, text: str, **params) -> dict:
    out = build_step(name, params).apply(Document("d", text, {}))
    assert not isinstance(out, str), out
    return out.meta


ENGLISH = ("The committee met on Monday to discuss the budget for the coming year. "
           "Members agreed that the school needs new books and that the library should stay open longer. "
           "After a long debate, the proposal was accepted with a clear majority of the votes. "
           "The chair thanked everyone for their time and closed the meeting shortly after noon. ")
CHINESE = ("今天上午，市政府召开了关于城市交通建设的工作会议。会议指出，我们要加快地铁和公交系统的建设，"
           "让市民出行更加方便。与会代表认为，这是一个关系到每个人生活的重要问题。"
           "他们也提出了很多有价值的建议，政府表示将认真研究并尽快落实。")


# ----- cleaners ---------------------------------------------------------------------------------

def test_fix_encoding_repairs_mojibake():
    assert run("fix_encoding", "The Mona Lisa doesnâ€™t have eyebrows.") == "The Mona Lisa doesn’t have eyebrows."
    assert run("fix_encoding", "æµ‹è¯•ä¸­æ–‡") == "测试中文"


def test_fix_encoding_leaves_real_chinese_text_as_written():
    """People's Daily and review text is full of ，。！（）“”: none of it may change; mojibake of it is repaired."""
    from tests.corpora import chinese_news, chinese_reviews

    for text in (chinese_news(30_000), chinese_reviews(20_000)):
        assert any(c in text for c in "，！（）“”")
        assert run("fix_encoding", text) == text
        broken = text[:2000].encode("utf-8").decode("latin-1", "replace")  # UTF-8 read as Latin-1
        assert run("fix_encoding", broken) == text[:2000]
    kept = "全角：ＡＢＣ１２３，引号“”‘’，ﬁ 连字，ｱｲｳ 半角假名。"
    assert run("fix_encoding", kept) == kept


def test_normalize_forms():
    assert run("normalize", "ｆｕｌｌ　ｗｉｄｔｈ １２３", form="NFKC") == "full width 123"
    assert run("normalize", "e\u0301") == "\u00e9"  # NFC composes


def test_whitespace_cleanup():
    text = "a\u0000b  \t c\r\n\n\n\n  line two \u200b\n"
    assert run("whitespace", text) == "ab c\n\n  line two"  # indentation kept (code, nested lists)
    assert run("whitespace", text, keep_indentation=False) == "ab c\n\nline two"
    assert run("whitespace", " \n\t\u0007 ") == "empty after whitespace cleanup"


def test_boilerplate_lines_follow_c4_line_rules():
    text = ("This is a proper sentence with words.\nHome | About | Contact\nPlease enable JavaScript to view this page.\n"
            "By using this site you agree to our privacy policy.\nToo short.\n今天的天气非常好，我们一起去公园散步。\n首页")
    assert run("boilerplate_lines", text) == "This is a proper sentence with words.\n今天的天气非常好，我们一起去公园散步。"


def test_c4_document_rules():
    assert run("c4", ENGLISH.replace("noon.", "noon. Lorem ipsum dolor sit amet.")) == "c4: lorem ipsum"
    assert run("c4", ENGLISH + "\nfunction f() { return 1; }") == "c4: curly bracket"
    assert run("c4", "One sentence only, but long enough here.") == "c4: fewer than 5 sentences"
    assert run("c4", ENGLISH * 2).startswith("The committee")
    assert run("c4", CHINESE + CHINESE).startswith("今天上午")  # Chinese sentences end in 。


def test_sentence_and_word_splitting_handle_chinese():
    assert len(split_sentences(CHINESE)) == 4
    assert split_sentences("Dr. Smith went home. He slept!") == ["Dr.", "Smith went home.", "He slept!"]
    words = split_words("我们要加快地铁和公交系统的建设", "zh")
    assert "地铁" in words and "加快" in words and len(words) < 14  # segmented, not one word per character
    assert split_words("Don't split-words like these, 2024!", "en") == ["Don't", "split-words", "like", "these", "2024"]


def test_pii_patterns():
    pii = PII()
    text, counts = pii.redact("Mail alice.smith+tag@example.co.uk or call +1 (415) 555-0132 or 138-1234-5678 / "
                              "+86 13912345678. Server 192.168.1.20 and 2001:db8::8a2e:370:7334. "
                              "Office (020) 8765-4321, desk 415.555.0132, +44 20 7946 0958. "
                              "身份证号 11010519491231002X 已登记。")
    assert text == ("Mail <EMAIL> or call <PHONE> or <PHONE> / <PHONE>. Server <IP_ADDRESS> and <IP_ADDRESS>. "
                    "Office <PHONE>, desk <PHONE>, <PHONE>. 身份证号 <ID_NUMBER> 已登记。")
    assert counts == {"email": 1, "phone": 6, "ip_address": 2, "id_number": 1}


def test_pii_in_chinese_sentences():
    """No spaces between Han characters and digits: numbers and addresses inside sentences are found, with or
    without separators, and nothing of the sentence around them is eaten."""
    pii = PII()
    cases = {
        "请拨打电话13812345678联系我们。": "请拨打电话<PHONE>联系我们。",
        "电话：13812345678。": "电话：<PHONE>。",
        "手机138-1234-5678或者+86 139 8765 4321都可以": "手机<PHONE>或者<PHONE>都可以",
        "发邮件到zhang.wei@example.com或者到我办公室": "发邮件到<EMAIL>或者到我办公室",
        "服务器地址是192.168.1.10，端口8080。": "服务器地址是<IP_ADDRESS>，端口8080。",
        "他的身份证号是11010519491231002X，已经登记。": "他的身份证号是<ID_NUMBER>，已经登记。",
    }
    for text, want in cases.items():
        assert pii.redact(text)[0] == want, text
    ordinary = ("订单号123456789012345，金额3.1415926535元，1998年1月1日，邮编100871，"
                "GDP增长7.8%，人口14.1亿，ISBN 978-7-111-12345-6。")
    assert pii.redact(ordinary) == (ordinary, {})


def test_pii_leaves_lookalikes_alone():
    pii = PII()
    keep = ("Version 3.11.7 was released; 999.1.1.1 is no address; slices a[::2] and std::vector; "
            "the year 2024 and 12:30:45; ID 110105194912310021 has a bad checksum; x = 1_000_000; "
            "'{:+f}'.format(3.14) gives '+3.140000'; '01 012 0123 01234'; pi = 3.14159 265 3589.")
    assert pii.redact(keep) == (keep, {})


def test_cn_id_checksum():
    assert valid_cn_id("11010519491231002X")
    assert valid_cn_id("440524188001010014")
    assert not valid_cn_id("440524188001010015")


def test_language_identification_and_filtering():
    assert meta("language", ENGLISH)["language"] == "en"
    m = meta("language", CHINESE)
    assert m["language"] == "zh" and m["language_score"] > 0.9
    assert run("language", CHINESE, keep=["en"]) == "language: zh not in en"
    assert run("language", ENGLISH, keep=["en", "zh"]) == ENGLISH


# ----- Gopher quality ---------------------------------------------------------------------------

def test_gopher_quality_accepts_real_english_and_chinese():
    assert run("gopher_quality", ENGLISH) == ENGLISH
    assert run("gopher_quality", CHINESE) == CHINESE


@pytest.mark.parametrize("text,reason", [
    ("Too few words here.", "4 words < min_words 50"),  # reasons a person can read: the value and the rule
    ("supercalifragilisticexpialidocious " * 60, "mean word length"),
    ("a b c d e f g h i j " * 10, "mean word length"),
    (ENGLISH + " #tag" * 40, "'#'"),
    (ENGLISH + " and so on..." * 30, "ellipses"),
    ("\n".join(f"- item {w} of the list" for w in ENGLISH.split()[:60]), "bullet"),
    ("\n".join(f"{w} and then the story goes on and on for a while longer..." for w in ENGLISH.split()[:20]),
     "end in an ellipsis"),
    (" ".join(["1234"] * 30 + ENGLISH.split()[:40]), "have a letter"),
    ("Cats chase mice; dogs chase cats; mice fear cats. " * 12, "stop words"),
])
def test_gopher_quality_rules(text, reason):
    result = run("gopher_quality", text)
    assert isinstance(result, str) and result.startswith("gopher_quality") and reason in result, result


def test_gopher_quality_chinese_rules():
    assert "words <" in run("gopher_quality", "今天天气很好。")
    no_stop = "，".join(["经济发展", "社会进步", "科技创新", "文化繁荣", "生态保护"] * 12) + "。"
    assert "stop words" in run("gopher_quality", no_stop)
    assert run("gopher_quality", CHINESE, per_language={"zh": {"min_words": 500}}).startswith("gopher_quality: ")


def test_rules_switch_off_individually():
    assert run("gopher_quality", "Too few words here.", min_words=None, min_stop_words=0) == "Too few words here."


def test_unknown_parameter_names_nearest():
    with pytest.raises(ConfigError, match="min_words"):
        build_step("gopher_quality", {"min_word": 3})
    with pytest.raises(ConfigError, match="gopher_quality"):
        build_step("gopher_qualty", {})


# ----- Gopher repetition ------------------------------------------------------------------------

def test_gopher_repetition_rules():
    assert run("gopher_repetition", ENGLISH) == ENGLISH
    para = "The same paragraph again and again."
    assert "duplicated paragraphs" in run("gopher_repetition", "\n\n".join([para] * 3 + [ENGLISH]))
    lines = "\n".join(["Buy now!"] * 4 + ENGLISH.split(". "))
    assert "duplicated lines" in run("gopher_repetition", lines)
    assert "top 2-gram" in run("gopher_repetition", "big deal " * 30 + ENGLISH)
    assert "duplicated 5-grams" in run("gopher_repetition", ENGLISH + " ".join(ENGLISH.split()[:30]) * 2)
    zh_repeat = CHINESE + "我们要加快地铁和公交系统的建设" * 6
    assert run("gopher_repetition", zh_repeat).startswith("gopher_repetition")
    assert run("gopher_repetition", CHINESE) == CHINESE


# ----- FineWeb ----------------------------------------------------------------------------------

def test_fineweb_rules():
    assert run("fineweb", ENGLISH) == ENGLISH
    no_punct = "\n".join(w + " is a word in this line without an end" for w in ENGLISH.split()[:20])
    assert "end in punctuation" in run("fineweb", no_punct)
    assert "short" in run("fineweb", "\n".join(["Short line."] * 3 + [f"Item {i}." for i in range(10)] + [ENGLISH]))
    dup = ENGLISH + "\n" + "Read more about this topic here.\n" * 2
    assert "duplicated lines" in run("fineweb", dup)
    listy = "\n".join(f"{w}." for w in ENGLISH.split()[:40])
    assert "line breaks per word" in run("fineweb", listy, max_short_line_ratio=None, max_char_dup_ratio=None)
    assert run("fineweb", CHINESE) == CHINESE
    zh_short = "\n".join(["你好。", "谢谢。", "再见。", "好的。"] + [CHINESE])
    assert "short" in run("fineweb", zh_short)


def test_length_filter():
    assert run("length", "abc", min_chars=5) == "length: 3 characters < min_chars 5"
    assert run("length", CHINESE, max_words=10).startswith("length: ")
    assert run("length", ENGLISH, min_words=10) == ENGLISH
