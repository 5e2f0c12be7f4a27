"""Evol-Instruct (Xu et al. 2023, WizardLM): instructions rewritten into harder ones (in depth) or new ones of the
same domain (in breadth), round after round, with the paper's elimination rules.

Each round, every instruction in the pool is evolved once by a method drawn with a seeded generator (in-depth: add
constraints, deepen, concretise, increase reasoning steps, complicate the input; or in-breadth), the model answers
the evolved instruction, and the evolution is eliminated when (the paper's section 3.3):
  1. it brings no information gain: the model, asked with the paper's equality prompt, judges the two equal;
  2. it is hard to answer: the response contains "sorry" and is shorter than 80 words;
  3. the response holds only punctuation and stop words;
  4. it copies words of the evolving prompt ("#The Given Prompt#", "#Rewritten Prompt#", "given prompt",
     "rewritten prompt", "created prompt"; the Chinese prompts' 给定提示 / 改写后的提示 / 创建的提示).
A failed evolution keeps the original instruction in the pool for the next round; a successful one replaces it.
English and Chinese prompt sets; the language follows the instruction.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lmforge.infer.client import ModelClient, Sampling
from lmforge.synth.common import NoveltyFilter, SynthRun, data_stage_checks, read_eval_texts
from lmforge.synth.config import EvolConfig
from lmforge.text import CJK_CHAR

# the paper's prompts, verbatim (their long lines included)
DEPTH_EN = """I want you act as a Prompt Rewriter.
Your objective is to rewrite a given prompt into a more complex version to make those famous AI systems (e.g., chatgpt and GPT4) a bit harder to handle.
But the rewritten prompt must be reasonable and must be understood and responded by humans.
Your rewriting cannot omit the non-text parts such as the table and code in #The Given Prompt#:. Also, please do not omit the input in #The Given Prompt#.
You SHOULD complicate the given prompt using the following method:
{method}
You should try your best not to make the #Rewritten Prompt# become verbose, #Rewritten Prompt# can only add 10 to 20 words into #The Given Prompt#.
'#The Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not allowed to appear in #Rewritten Prompt#
#The Given Prompt#:
{instruction}
#Rewritten Prompt#:
"""
BREADTH_EN = """I want you act as a Prompt Creator.
Your goal is to draw inspiration from the #Given Prompt# to create a brand new prompt.
This new prompt should belong to the same domain as the #Given Prompt# but be even more rare.
The LENGTH and complexity of the #Created Prompt# should be similar to that of the #Given Prompt#.
The #Created Prompt# must be reasonable and must be understood and responded by humans.
'#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' are not allowed to appear in #Created Prompt#
#Given Prompt#:
{instruction}
#Created Prompt#:
"""
METHODS_EN = {
    "constraints": "Please add one more constraints/requirements into #The Given Prompt#'",
    "deepen": "If #The Given Prompt# contains inquiries about certain issues, the depth and breadth of the inquiry "
              "can be increased.",
    "concretizing": "Please replace general concepts with more specific concepts.",
    "reasoning": "If #The Given Prompt# can be solved with just a few simple thinking processes, you can rewrite it "
                 "to explicitly request multiple-step reasoning.",
    "complicate_input": "Please add a concrete input that the rewritten prompt must work on, such as a table, a "
                        "piece of code or data in JSON format.",
}
DEPTH_ZH = """我希望你充当提示改写者。
你的目标是把给定的提示改写成更复杂的版本，让著名的 AI 系统（例如 ChatGPT 和 GPT-4）更难应对。
但改写后的提示必须合理，并且人类能够理解和回答。
改写时不能省略 #给定提示# 中的表格、代码等非文本部分，也不要省略其中的输入。
你应当用以下方法让给定提示更复杂：
{method}
尽量不要让 #改写后的提示# 变得冗长，它只能在 #给定提示# 的基础上增加 10 到 20 个字词。
#改写后的提示# 中不得出现“#给定提示#”“#改写后的提示#”“给定提示”“改写后的提示”等字样。
#给定提示#：
{instruction}
#改写后的提示#：
"""
BREADTH_ZH = """我希望你充当提示创作者。
你的目标是从 #给定提示# 中获得灵感，创作一个全新的提示。
新提示应属于与 #给定提示# 相同的领域，但更加少见。
#创建的提示# 的长度和复杂度应与 #给定提示# 相近。
#创建的提示# 必须合理，并且人类能够理解和回答。
#创建的提示# 中不得出现“#给定提示#”“#创建的提示#”“给定提示”“创建的提示”等字样。
#给定提示#：
{instruction}
#创建的提示#：
"""
METHODS_ZH = {
    "constraints": "请在 #给定提示# 中再增加一个约束或要求。",
    "deepen": "如果 #给定提示# 包含对某些问题的询问，可以增加询问的深度和广度。",
    "concretizing": "请把笼统的概念替换成更具体的概念。",
    "reasoning": "如果 #给定提示# 只需几步简单思考就能解决，请改写为明确要求多步推理。",
    "complicate_input": "请加入改写后的提示必须处理的具体输入，例如一张表格、一段代码或 JSON 数据。",
}
EQUAL_EN = """Here are two Instructions to ChatGPT AI, do you think they are equal to each other, which meet the following requirements:
1. They have same constraints and requirments.
2. They have same depth and breadth of the inquiry.
The First Prompt: {a}
The Second Prompt: {b}
Your Judgement (Just answer: Equal or Not Equal. No need to explain the reason.):"""
EQUAL_ZH = """下面是给 AI 的两条指令，请判断它们是否等同，即满足：
1. 约束和要求相同；
2. 询问的深度和广度相同。
第一条：{a}
第二条：{b}
你的判断（只回答“相同”或“不同”，无需解释）："""
COPIED = ("#the given prompt#", "#rewritten prompt#", "#given prompt#", "#created prompt#", "given prompt",
          "rewritten prompt", "created prompt", "给定提示", "改写后的提示", "创建的提示")
STOP_WORDS = {"a", "an", "the", "and", "or", "of", "to", "in", "is", "it", "i", "you", "that", "this", "be", "are",
              "的", "了", "是", "和", "在", "我", "你", "吗", "呢", "吧", "啊"}
DEPTH_METHODS = tuple(METHODS_EN)


def _zh(text: str) -> bool:
    return bool(CJK_CHAR.search(text))


def evolve_prompt(instruction: str, method: str) -> str:
    zh = _zh(instruction)
    if method == "breadth":
        return (BREADTH_ZH if zh else BREADTH_EN).format(instruction=instruction)
    return (DEPTH_ZH if zh else DEPTH_EN).format(method=(METHODS_ZH if zh else METHODS_EN)[method],
                                                 instruction=instruction)


def clean_evolved(reply: str) -> str:
    """The rewritten instruction: the reply without a leading label the model may repeat."""
    text = reply.strip()
    text = re.sub(r"^(#?(Rewritten|Created) Prompt#?\s*[:：]|#?(改写后的提示|创建的提示)#?\s*[:：])\s*", "", text, flags=re.I)
    return text.strip()


def elimination_reason(original: str, evolved: str, response: str, judged_equal: bool | None) -> str | None:
    """Why the paper's rules eliminate an evolution (module docstring), or None."""
    if not evolved:
        return "elimination: empty evolution"
    lowered = evolved.lower()
    copied = next((c for c in COPIED if c in lowered), None)
    if copied:
        return f"elimination: copies {copied!r} from the evolving prompt"
    if judged_equal:
        return "elimination: no information gain (judged equal to the original)"
    words = response.split()
    if ("sorry" in response.lower() or "抱歉" in response) and (len(words) < 80 if not _zh(response)
                                                                  else len(response) < 160):
        return "elimination: the response is an apology shorter than 80 words"
    tokens = re.findall(r"\w+", response.lower())
    if not tokens or all(t in STOP_WORDS for t in tokens):
        return "elimination: the response is only punctuation and stop words"
    if evolved.strip() == original.strip():
        return "elimination: unchanged"
    return None


def parse_equal(reply: str) -> bool | None:
    r = reply.strip().lower()
    if r.startswith(("not equal", "不同", "不相同", "不等")):
        return False
    if r.startswith(("equal", "相同", "等同")):
        return True
    return None


def read_instructions(path: str) -> list[str]:
    """Evol-Instruct's starting pool: seed tasks, alpaca records (instruction + input) or sharegpt first turns."""
    from lmforge.data.sources import CorpusError, iter_records

    out = []
    for where, rec in iter_records(path):
        if isinstance(rec.get("instruction"), str):
            inst = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
        elif isinstance(rec.get("conversations"), list) and rec["conversations"]:
            inst = rec["conversations"][0].get("value", "")
        elif isinstance(rec.get("prompt"), str):
            inst = rec["prompt"]
        else:
            raise CorpusError(f"{where}: no instruction (an 'instruction', 'prompt' or sharegpt 'conversations' field)")
        if inst.strip():
            out.append(inst.strip())
    return out


@dataclass
class EvolInstruct:
    client: ModelClient
    instructions: list[str]
    cfg: EvolConfig = field(default_factory=EvolConfig)

    def methods(self, rng: np.random.Generator, n: int) -> list[str]:
        choices = list(DEPTH_METHODS) + ["breadth"]
        weights = [(1 - self.cfg.breadth_share) / len(DEPTH_METHODS)] * len(DEPTH_METHODS) + [self.cfg.breadth_share]
        return [choices[i] for i in rng.choice(len(choices), size=n, p=weights)]

    def run(self, out: str, resume: bool = False, overwrite: bool = False) -> dict:
        from lmforge.progress import progress

        run = SynthRun(out, resume, overwrite)
        st = run.state or {"round": 0, "pool": list(self.instructions), "kept": [], "rejects": [], "per_round": [],
                           "similarities": []}
        novelty = NoveltyFilter([k["instruction"] for k in st["kept"]])
        s = Sampling(temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens, seed=self.cfg.seed)
        bar = progress(total=self.cfg.rounds, initial=st["round"], desc="evol-instruct", unit="round",
                       enabled=self.cfg.progress)
        started = time.perf_counter()
        while st["round"] < self.cfg.rounds and not (self.cfg.num and len(st["kept"]) >= self.cfg.num):
            rng = np.random.default_rng([self.cfg.seed, st["round"]])
            pool = st["pool"]
            methods = self.methods(rng, len(pool))
            evolved_replies = self.client.complete([evolve_prompt(i, m) for i, m in zip(pool, methods)], s)
            evolved = [clean_evolved(r[0].text) for r in evolved_replies]
            answered = self.client.complete(evolved, s)
            responses = [r[0].text.strip() for r in answered]
            errors = [a[0].error or b[0].error for a, b in zip(evolved_replies, answered)]
            judged = [parse_equal(r[0].text) for r in self.client.complete(
                [(EQUAL_ZH if _zh(a) else EQUAL_EN).format(a=a, b=b) for a, b in zip(pool, evolved)],
                Sampling(temperature=0.0, max_tokens=4))]
            counts, next_pool = Counter(), []
            for original, method, new, response, equal, error in zip(pool, methods, evolved, responses, judged, errors):
                counts[method] += 1
                reason = f"request: {error}" if error else elimination_reason(original, new, response, equal)
                if reason is None:
                    score, closest = novelty.check(new)
                    st["similarities"].append(round(score, 4))
                    if score >= self.cfg.novelty_threshold:
                        reason = f"rouge-l: {score:.3f} to {closest!r}"
                if reason is not None:
                    st["rejects"].append({"instruction": new, "input": "", "output": response, "reason": reason,
                                          "evolved_from": original, "method": method, "round": st["round"]})
                    next_pool.append(original)  # a failed evolution: the original evolves again next round
                    counts["eliminated"] += 1
                    continue
                novelty.add(new)
                st["kept"].append({"instruction": new, "input": "", "output": response, "evolved_from": original,
                                   "method": method, "round": st["round"]})
                next_pool.append(new)
                counts["kept"] += 1
            st["pool"] = next_pool
            st["per_round"].append({"round": st["round"], **counts})
            st["round"] += 1
            run.save_state(st)
            bar.update(1)
        bar.close()
        kept, dropped = data_stage_checks(st["kept"], read_eval_texts(self.cfg.eval_data))
        seconds = time.perf_counter() - started
        stats = run.write(kept, st["rejects"] + dropped, {
            "method": "evol-instruct", "rounds": st["round"], "per_round": st["per_round"],
            "seconds": round(seconds, 1), "tokens": getattr(self.client, "usage", None)}, st["similarities"])
        return stats
