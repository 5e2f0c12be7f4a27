"""Synthetic data: self-instruct's heuristics and ROUGE-L novelty (against rouge-score), the parsers, Evol-Instruct's
elimination rules, the data-stage checks (exact / near duplicates, contamination) on planted items, and one round of
each pipeline end to end with a tiny model taught the replies (through lmforge's engine): generated = kept + rejected,
every reject with its reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.infer.client import EngineClient
from lmforge.model import load_hf_model, save_hf_model
from lmforge.synth.common import NoveltyFilter, data_stage_checks, seed_path
from lmforge.synth.evol import EvolConfig, EvolInstruct, clean_evolved, elimination_reason, evolve_prompt, parse_equal
from lmforge.synth.selfinstruct import (
    SelfInstruct,
    SelfInstructConfig,
    classification_prompt,
    copies_demonstration,
    heuristic_reason,
    instance_prompt,
    parse_instances,
    parse_instructions,
    parse_yes,
    read_seeds,
)
from lmforge.tokenizer import load_tokenizer
from tests.prompting.test_prompting import _teach

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def test_heuristics_follow_the_paper_in_english_and_chinese():
    assert heuristic_reason("Give three tips for staying healthy.") is None
    assert heuristic_reason("Describe the picture below in detail.") == "heuristic: keyword 'picture'"
    assert heuristic_reason("Summarize it.").startswith("heuristic: length 2 words")
    assert heuristic_reason("Write a program that sorts a list.") == "heuristic: starts with 'Write a program'"
    assert heuristic_reason("- List five fruits please.") == "heuristic: starts with punctuation"
    assert heuristic_reason("Éxplain the rules of chess briefly.") == "heuristic: starts with a non-English character"
    assert heuristic_reason("给出三条保持健康的建议。") is None
    assert heuristic_reason("描述这张图片里的内容。") == "heuristic: keyword '图片'"
    assert heuristic_reason("翻译").startswith("heuristic: length 2 characters")


def test_novelty_filter_equals_rouge_score():
    pool = ["Give three tips for staying healthy.", "Translate the sentence into French.",
            "Classify the sentiment of the sentence as positive or negative."]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    f = NoveltyFilter(pool)
    for cand in ["Give three tips for staying happy.", "Translate the sentence into German.", "Name a primary colour.",
                 "Classify the sentence's sentiment: positive, neutral or negative?"]:
        ref = max(scorer.score(p, cand)["rougeL"].fmeasure for p in pool)
        score, closest = f.check(cand)
        assert score == pytest.approx(ref)
        assert closest is None or scorer.score(closest, cand)["rougeL"].fmeasure == pytest.approx(ref)
    zh = NoveltyFilter(["给出三条保持健康的建议。"])
    assert zh.check("给出三条保持快乐的建议。")[0] > 0.7  # by characters (rouge-score itself would give 0.0)


def test_parsers():
    assert parse_instructions(" Name a fruit.\n8. List three colours.\n9 . Say hi to me now.", 7) == \
        ["Name a fruit.", "List three colours.", "Say hi to me now."]
    assert parse_yes(" Yes") is True and parse_yes("No.") is False and parse_yes("是") is True and parse_yes("?") is None
    got = parse_instances("Example 1\nInput: France\nOutput: Paris\nExample 2\nInput: Japan\nOutput: Tokyo\n", False)
    assert got == [{"input": "France", "output": "Paris"}, {"input": "Japan", "output": "Tokyo"}]
    assert parse_instances("Example 1\nOutput: red, orange\n", False) == [{"input": "", "output": "red, orange"}]
    assert parse_instances("Class label: positive\nInput: Great film.\nClass label: negative\nInput: Dull.", True) == \
        [{"input": "Great film.", "output": "positive"}, {"input": "Dull.", "output": "negative"}]
    # a direct answer is the output (the authors' parse_input_output); a broken Input/Output layout is nothing
    assert parse_instances("Paris is the capital.\nTask: next", False) == [{"input": "", "output": "Paris is the capital."}]
    assert parse_instances("Example 1\nInput: France\n", False) == []
    assert parse_instances("  ", False) == []
    assert parse_instances("no labels here", True) == []
    seed = read_seeds(seed_path("builtin:seeds-en"))[0]
    shown = seed.instances[0]["output"]
    assert copies_demonstration(f"Sure.\n{shown}\nDone.", [seed]) and not copies_demonstration(shown[:-3], [seed])
    # a chat model restarting the list or labelling its items
    assert parse_instructions(" 1. Convert 3 km to miles.\n10. Task 3: Name a river in Asia.", 9) == \
        ["Convert 3 km to miles.", "Name a river in Asia."]
    assert parse_equal("Not Equal") is False and parse_equal("Equal") is True and parse_equal("相同") is True
    assert clean_evolved("#Rewritten Prompt#: Do X in two steps.") == "Do X in two steps."


def test_evol_elimination_rules():
    ok = "Explain photosynthesis in three steps, naming the inputs and outputs of each."
    answer = "Light is absorbed, water is split, and carbon dioxide is fixed into sugar; oxygen is released."
    assert elimination_reason("Explain photosynthesis.", ok, answer, False) is None
    assert "no information gain" in elimination_reason("Explain photosynthesis.", ok, answer, True)
    assert "apology" in elimination_reason("x", ok, "Sorry, I cannot help with that.", False)
    assert "stop words" in elimination_reason("x", ok, "the and of ...", False)
    assert "copies 'rewritten prompt'" in elimination_reason("x", "The rewritten prompt asks: explain it.", answer, False)
    assert "给定提示" in evolve_prompt("解释什么是光合作用。", "constraints")
    assert "#The Given Prompt#" in evolve_prompt("Explain photosynthesis.", "deepen")
    assert "#Created Prompt#" in evolve_prompt("Explain photosynthesis.", "breadth")


PLANETS = ("Mercury is closest to the sun, then Venus, then Earth, our home, then Mars, the red planet; beyond the "
           "asteroid belt come the gas giants Jupiter and Saturn, then the ice giants Uranus and Neptune, the last of "
           "the eight planets, about thirty times as far from the sun as Earth is.")


def test_data_stage_checks_drop_duplicates_and_contamination():
    items = [{"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital of France."},
             {"instruction": "name the capital of  FRANCE.", "input": "", "output": "Paris is the capital of France."},
             {"instruction": "List the planets of the solar system in order from the sun outwards.", "input": "",
              "output": PLANETS},
             {"instruction": "List the planets of our solar system in order from the sun outwards.", "input": "",
              "output": PLANETS},
             {"instruction": "Solve the problem.", "input": "Natalia sold clips to 48 of her friends in April, and "
              "then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
              "output": "72"},
             {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, move, sleep."},
             {"instruction": "Describe a cat.", "input": "", "output": "The cat is a cat. " * 12}]
    eval_set = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
                "many clips did Natalia sell altogether in April and May?"]
    kept, rejected = data_stage_checks(items, eval_set)
    assert [k["instruction"] for k in kept] == [items[0]["instruction"], items[2]["instruction"], items[5]["instruction"]]
    reasons = {r["instruction"]: r["reason"] for r in rejected}
    assert reasons[items[1]["instruction"]].startswith("exact duplicate: of item 0")
    assert reasons[items[3]["instruction"]].startswith("near duplicate: cluster of item 2")
    assert reasons[items[4]["instruction"]].startswith("contamination:")
    assert reasons["Describe a cat."].startswith("quality: gopher_repetition:")
    assert len(kept) + len(rejected) == len(items)


def test_builtin_seed_sets_read():
    en, zh = read_seeds(seed_path("builtin:seeds-en")), read_seeds(seed_path("builtin:seeds-zh"))
    assert len(en) >= 10 and len(zh) >= 10 and any(s.is_classification for s in en)
    assert all(s.instances for s in en + zh)


@pytest.fixture(scope="module")
def synth_setup(trained_dir, tmp_path_factory):
    """A tiny Llama taught one self-instruct round and one Evol-Instruct round, prompt by prompt."""
    from tests.models import tiny_llama

    d = tiny_llama(tmp_path_factory.mktemp("synth_model"), trained_dir, hidden=128, max_positions=2048)
    tok = load_tokenizer(d)
    model = load_hf_model(d)
    client = EngineClient(model, tok)
    end = tok.special_tokens["<|im_end|>"]
    seeds = read_seeds(seed_path("builtin:seeds-en"))
    si_cfg = SelfInstructConfig(num=2, prompts_per_round=1, max_rounds=1, temperature=0.0, classification_shots=2,
                                instance_shots=1, seeds_per_prompt=4, progress=False, max_tokens=96)
    si = SelfInstruct(client, seeds, si_cfg)
    (prompt, first, _), = si.round_prompts(np.random.default_rng([0, 0]), [])
    new = ["Name the capital city of the given country.", "List four colours of the rainbow in order."]
    listed = (f" {new[0]}\n{first + 1}. Describe the picture in the photo carefully.\n{first + 2}. "
              f"Give three tips for staying healthy.\n{first + 3}. {new[1]}")
    pairs = [(prompt, listed)]
    shots = seeds[:2]
    for inst in new:
        pairs.append((classification_prompt(shots, inst), " No"))
    pairs.append((instance_prompt([s for s in seeds if not s.is_classification][:1], new[0], False),
                  "Example 1\nInput: France\nOutput: Paris\nExample 2\nInput: Japan\nOutput: Tokyo"))
    pairs.append((instance_prompt([s for s in seeds if not s.is_classification][:1], new[1], False),
                  "Example 1\nOutput: red, orange, yellow, green"))
    # Evol-Instruct: one instruction, the method its seeded draw picks, the response, the equality judgement
    start = "Explain what photosynthesis is."
    ev_cfg = EvolConfig(rounds=1, temperature=0.0, progress=False, max_tokens=64)
    ev = EvolInstruct(client, [start], ev_cfg)
    method = ev.methods(np.random.default_rng([0, 0]), 1)[0]
    evolved = "Explain what photosynthesis is in three steps, naming what goes in and what comes out."
    from lmforge.synth.evol import EQUAL_EN

    pairs += [(evolve_prompt(start, method), evolved),
              (evolved, "Light is absorbed, water is split, and carbon dioxide becomes sugar while oxygen is released."),
              (EQUAL_EN.format(a=start, b=evolved), " Not Equal")]
    ids = [(client.render([{"role": "user", "content": p}]), tok.encode(a) + [end]) for p, a in pairs]
    _teach(model, ids, steps=100)
    save_hf_model(model, d)
    return {"dir": d, "seeds": seeds, "si_cfg": si_cfg, "ev_cfg": ev_cfg, "new": new, "start": start,
            "evolved": evolved, "method": method}


def test_self_instruct_round_keeps_novel_instructions_and_rejects_with_reasons(synth_setup, tmp_path):
    s = synth_setup
    stats = SelfInstruct(EngineClient(s["dir"]), s["seeds"], s["si_cfg"]).run(str(tmp_path / "si"))
    rows = [json.loads(x) for x in (tmp_path / "si" / "data" / "alpaca.jsonl").read_text().splitlines()]
    assert {r["instruction"] for r in rows} == set(s["new"])
    assert {"instruction": s["new"][0], "input": "France", "output": "Paris"} in rows
    rejects = [json.loads(x) for x in (tmp_path / "si" / "rejects" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["instruction"]: r["reason"] for r in rejects}
    assert reasons["Describe the picture in the photo carefully."] == "heuristic: keyword 'picture'"
    assert reasons["Give three tips for staying healthy."].startswith("rouge-l: 1.000 to 'Give three tips")
    assert stats["generated"] == stats["kept"] + stats["rejected"] == len(rows) + len(rejects)
    assert (tmp_path / "si" / "rouge_l.png").exists() and stats["instructions_kept"] == 2
    sharegpt = [json.loads(x) for x in (tmp_path / "si" / "data" / "sharegpt.jsonl").read_text().splitlines()]
    assert sharegpt[0]["conversations"][0]["from"] == "human"
    # the kept data is what `lmforge finetune` reads
    from lmforge.finetune.conversations import load_conversations

    assert len(load_conversations(str(tmp_path / "si" / "data" / "alpaca.jsonl"))) == len(rows)
    from lmforge.train.config import RunDirectoryError

    with pytest.raises(RunDirectoryError, match="--resume"):
        SelfInstruct(EngineClient(s["dir"]), s["seeds"], s["si_cfg"]).run(str(tmp_path / "si"))


def test_evol_instruct_round_evolves_and_answers(synth_setup, tmp_path):
    s = synth_setup
    stats = EvolInstruct(EngineClient(s["dir"]), [s["start"]], s["ev_cfg"]).run(str(tmp_path / "ev"))
    rows = [json.loads(x) for x in (tmp_path / "ev" / "data" / "alpaca.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [s["evolved"]] and rows[0]["output"].startswith("Light is absorbed")
    state = json.loads((tmp_path / "ev" / "state.json").read_text())
    assert state["kept"][0]["method"] == s["method"] and state["pool"] == [s["evolved"]]
    assert stats["generated"] == stats["kept"] + stats["rejected"] == 1


def test_self_instruct_resume_equals_an_uninterrupted_run(synth_setup, tmp_path):
    """Rounds are saved as they finish and a round's draws depend only on the seed and its number: two rounds in
    one go equal one round, stopped, then resumed for the second (greedy decoding: the same replies)."""
    from dataclasses import replace

    s = synth_setup
    cfg = replace(s["si_cfg"], num=50, max_rounds=2)
    whole = SelfInstruct(EngineClient(s["dir"]), s["seeds"], cfg).run(str(tmp_path / "whole"))
    SelfInstruct(EngineClient(s["dir"]), s["seeds"], replace(cfg, max_rounds=1)).run(str(tmp_path / "part"))
    resumed = SelfInstruct(EngineClient(s["dir"]), s["seeds"], cfg).run(str(tmp_path / "part"), resume=True)
    for name in ("data/alpaca.jsonl", "rejects/rejects.jsonl"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "part" / name).read_text()
    assert whole["rounds"] == resumed["rounds"] == 2 and whole["generated"] == resumed["generated"]


def test_self_instruct_stops_when_rounds_keep_nothing_and_says_why(tmp_path, capsys):
    """A model whose every instruction fails the filters (here: a picture task, refused by the paper's keyword
    heuristic, or a copy of a seed) must not run until killed: after stall_rounds empty rounds it stops and names
    the most common reasons."""
    from lmforge.infer.client import Completion, ModelClient

    class Parrot(ModelClient):  # the same useless list, whatever it is asked
        def complete(self, prompts, sampling, n=1):
            return [[Completion(" Draw a picture of a cat.\n2. Draw a picture of a dog.")] for _ in prompts]

    seeds = read_seeds(seed_path("builtin:seeds-en"))
    cfg = SelfInstructConfig(num=5, prompts_per_round=2, max_rounds=1000, stall_rounds=3, progress=False)
    stats = SelfInstruct(Parrot(), seeds, cfg).run(str(tmp_path / "si"))
    assert stats["rounds"] == 3 and stats["instructions_kept"] == 0
    assert stats["stopped"].startswith("3 rounds in a row kept nothing; most common reasons: heuristic (12)")
    assert "lmforge: stopping: 3 rounds in a row kept nothing" in capsys.readouterr().err
