"""Self-instruct (Wang et al. 2022): new instructions and their instances, bootstrapped from seed tasks by a model.

Each round sends `prompts_per_round` generation prompts (8 tasks each: 6 seeds and 2 earlier machine instructions
once there are some, drawn with a seeded generator; the classification variant lists classification tasks) and
parses the numbered tasks the model continues the list with. Every new instruction then passes, in order:

1. the paper's heuristics: more than 3 and at most 150 words (Chinese: 4 to 300 characters), none of the keywords a
   language model cannot act on (image, graph, picture, file, map, draw, plot, go to, video, audio, music,
   flowchart, diagram; Chinese: 图片, 图像, 图表, 文件, 地图, 画图, 视频, 音频, 音乐, 流程图, 示意图), not starting
   with "Write a program", a punctuation mark, or (English prompts) a non-ASCII character;
2. novelty: ROUGE-L (rouge-score's, Chinese by characters) below 0.7 to every instruction in the pool (seeds and
   kept machine ones);
3. classification or not (the model answers, few-shot from the seeds' `is_classification`);
4. instances: output-first for classification (a class label, then an input for it), input-first otherwise; an
   instruction whose instances do not parse, or whose instances give one input different outputs, is dropped.

Seed file: the paper's JSONL schema, {"id", "name", "instruction", "instances": [{"input", "output"}],
"is_classification"}, e.g. its 175 English seeds or a Chinese set written the same way.
"""

from __future__ import annotations

import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lmforge.data.sources import CorpusError, iter_records
from lmforge.infer.client import ModelClient, Sampling
from lmforge.synth.common import NoveltyFilter, SynthRun, data_stage_checks
from lmforge.synth.config import SelfInstructConfig
from lmforge.text import CJK_CHAR

BLACKLIST_EN = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
                "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
BLACKLIST_ZH = ("图片", "图像", "图表", "文件", "地图", "画图", "视频", "音频", "音乐", "流程图", "示意图")


@dataclass
class Seed:
    instruction: str
    instances: list[dict]
    is_classification: bool = False
    name: str = ""


def read_seeds(path: str) -> list[Seed]:
    """The paper's seed JSONL; a bad record names file:line and the field."""
    seeds = []
    for where, rec in iter_records(path):
        inst = rec.get("instruction")
        if not isinstance(inst, str) or not inst.strip():
            raise CorpusError(f"{where}: field 'instruction' is missing or empty")
        instances = rec.get("instances", [])
        if not isinstance(instances, list) or not all(isinstance(i, dict) and isinstance(i.get("output"), str)
                                                      for i in instances):
            raise CorpusError(f"{where}: field 'instances' must be a list of {{input, output}} objects")
        seeds.append(Seed(inst.strip(), [{"input": str(i.get("input", "")), "output": i["output"]} for i in instances],
                          bool(rec.get("is_classification", False)), str(rec.get("name", ""))))
    if not seeds:
        raise CorpusError(f"{path}: no seed tasks")
    return seeds


def _zh(text: str) -> bool:
    return bool(CJK_CHAR.search(text))


def heuristic_reason(inst: str) -> str | None:
    """Why the paper's heuristics drop an instruction, or None."""
    if _zh(inst):
        n = len(re.sub(r"\s", "", inst))
        if n < 4 or n > 300:
            return f"heuristic: length {n} characters (4 to 300)"
        bad = next((w for w in BLACKLIST_ZH if w in inst), None)
    else:
        n = len(inst.split())
        if n <= 3 or n > 150:
            return f"heuristic: length {n} words (4 to 150)"
        bad = next((w for w in BLACKLIST_EN if re.search(rf"\b{re.escape(w)}\b", inst, re.I)), None)
    if bad:
        return f"heuristic: keyword {bad!r}"
    if inst.startswith("Write a program"):
        return "heuristic: starts with 'Write a program'"
    if inst[0] in string.punctuation + "，。！？；：、":
        return "heuristic: starts with punctuation"
    if not _zh(inst) and not inst[0].isascii():
        return "heuristic: starts with a non-English character"
    return None


def generation_prompt(instructions: list[str], classification: bool = False, zh: bool = False) -> str:
    if zh:
        head = "请想出一系列分类任务，尽量写明可能的输出标签：\n\n" if classification else "请想出一系列任务：\n\n"
    else:
        head = ("Come up with a series of classification tasks. Try to specify the possible output labels when "
                "possible.\n\n" if classification else "Come up with a series of tasks:\n\n")
    return head + "".join(f"{i}. {t}\n" for i, t in enumerate(instructions, 1)) + f"{len(instructions) + 1}."


def parse_instructions(reply: str, first_number: int) -> list[str]:
    """The tasks the model listed after the prompt's last number ("9." ...), one per number."""
    text = f"{first_number}." + reply
    parts = re.split(r"(?:^|\n)\s*\d+\s?[.、]\s*", text)
    out = []
    for p in parts:
        # a chat model answering the list in its own words restarts it ("9. 1. Convert ...") or labels the items
        p = re.sub(r"^(?:\s*(?:\d+\s?[.、)]|(?:Task|Instruction)\s*\d*\s*[:：]|任务\s*\d*\s*[:：]))+", "",
                   re.sub(r"\s+", " ", p)).strip()
        if p:
            out.append(p)
    return out


def classification_prompt(seeds: list[Seed], instruction: str, zh: bool = False) -> str:
    q = "这个任务能否看作输出标签有限的分类任务？" if zh else \
        "Can the following task be regarded as a classification task with finite output labels?"
    shots = "".join(f"Task: {s.instruction}\nIs it classification? {'Yes' if s.is_classification else 'No'}\n\n"
                    for s in seeds)
    return f"{q}\n\n{shots}Task: {instruction}\nIs it classification?"


def parse_yes(reply: str) -> bool | None:
    r = reply.strip().lower()
    if r.startswith(("yes", "是", "能", "可以")):
        return True
    if r.startswith(("no", "否", "不")):
        return False
    return None


def instance_prompt(seeds: list[Seed], instruction: str, classification: bool) -> str:
    if classification:  # output-first: a label, then an input that has it
        head = ("Given the classification task definition and the class labels, generate an input that corresponds "
                "to each of the class labels. If the task doesn't require input, just generate possible class "
                "labels.\n\n")
        shots = "".join("Task: " + s.instruction + "\n" + "".join(
            f"Class label: {i['output']}\nInput: {i['input']}\n" for i in s.instances) + "\n" for s in seeds)
    else:  # input-first
        head = ("Come up with examples for the following tasks. Try to generate multiple examples when possible. If "
                "the task doesn't require additional input, you can generate the output directly.\n\n")
        shots = "".join("Task: " + s.instruction + "\n" + "".join(
            f"Example {k}\n" + (f"Input: {i['input']}\n" if i["input"] else "") + f"Output: {i['output']}\n"
            for k, i in enumerate(s.instances, 1)) + "\n" for s in seeds)
    return f"{head}{shots}Task: {instruction}\n"


def copies_demonstration(output: str, shots: list[Seed]) -> bool:
    """Whether `output` contains, verbatim, the output of an example the instance prompt showed (16+ characters:
    short labels and numbers may repeat by right)."""
    return any(len(i["output"]) >= 16 and i["output"] in output for s in shots for i in s.instances)


def parse_instances(reply: str, classification: bool) -> list[dict]:
    """(input, output) pairs of an instance reply; [] when nothing parses."""
    out = []
    if classification:
        for block in re.split(r"(?:^|\n)\s*Class label\s*[:：]", reply)[1:]:
            label, _, rest = block.partition("\n")
            m = re.match(r"\s*Input\s*[:：]\s*(.*)", rest, re.S)
            text = m.group(1).split("\nTask:")[0].strip() if m else ""
            if label.strip():
                out.append({"input": text, "output": label.strip()})
        return out
    for block in re.split(r"(?:^|\n)\s*Example\s*\d+\s*\n", "\n" + reply):
        block = block.split("\nTask:")[0]
        m = re.search(r"Output\s*[:：]\s*(.*)", block, re.S)
        if not m:
            continue
        i = re.search(r"Input\s*[:：]\s*(.*?)\n\s*Output\s*[:：]", block, re.S)
        output = m.group(1).strip()
        if output:
            out.append({"input": i.group(1).strip() if i else "", "output": output})
    if not out and not re.search(r"(?:^|\n)\s*(?:Input|Example)\s*\d*\s*[:：\n]", reply):
        # a reply that answers the task directly is its output with no input, as the authors' parse_input_output
        # (self_instruct/prepare_for_finetuning.py) reads it
        output = reply.split("\nTask:")[0].strip()
        if output:
            out.append({"input": "", "output": output})
    return out


def stalled_rounds(per_round: list[dict]) -> int:
    """How many of the last rounds in a row kept no instruction."""
    n = 0
    for r in reversed(per_round):
        if r.get("kept_instructions", 0):
            break
        n += 1
    return n


def top_reasons(rejects: list[dict], k: int = 3) -> str:
    """The k most common reject reasons, grouped by their kind (the text before ':'), with counts."""
    counts = Counter(str(r.get("reason", "")).split(":")[0] for r in rejects)
    return "; ".join(f"{reason} ({n})" for reason, n in counts.most_common(k)) or "none recorded"


@dataclass
class SelfInstruct:
    client: ModelClient
    seeds: list[Seed]
    cfg: SelfInstructConfig = field(default_factory=SelfInstructConfig)

    def _sampling(self, max_tokens=None) -> Sampling:
        return Sampling(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                        max_tokens=max_tokens or self.cfg.max_tokens, seed=self.cfg.seed)

    def round_prompts(self, rng: np.random.Generator, machine: list[str]) -> list[tuple[str, int, bool]]:
        """(prompt, first new number, classification variant) for one round, from the seeded generator."""
        out = []
        clf_seeds = [s for s in self.seeds if s.is_classification]
        for k in range(self.cfg.prompts_per_round):
            classification = bool(clf_seeds) and k % 4 == 3  # a quarter of the prompts ask for classification tasks
            pool = clf_seeds if classification else self.seeds
            n_seed = min(self.cfg.seeds_per_prompt, len(pool))
            picked = [pool[i].instruction for i in rng.choice(len(pool), n_seed, replace=False)]
            if machine and not classification:
                n_m = min(self.cfg.machine_per_prompt, len(machine))
                picked += [machine[i] for i in rng.choice(len(machine), n_m, replace=False)]
            zh = _zh(" ".join(picked))
            out.append((generation_prompt(picked, classification, zh), len(picked) + 1, classification))
        return out

    def _screen(self, prompts: list[tuple[str, int, bool]], replies, novelty: NoveltyFilter,
                st: dict) -> tuple[list[tuple[str, bool]], Counter]:
        """The new instructions of a round's replies that pass the heuristics and the ROUGE-L novelty filter, with
        their classification hint; every other one goes to the rejects with its reason."""
        new, counts = [], Counter()
        for (prompt, first, clf_hint), reply in zip(prompts, replies):
            if reply[0].error:  # the endpoint refused this prompt: set aside with its reason, the run goes on
                st["rejects"].append({"instruction": "", "input": prompt[-300:], "output": "", "round": st["round"],
                                      "reason": f"request: {reply[0].error}"})
                continue
            for inst in parse_instructions(reply[0].text, first):
                counts["generated"] += 1
                reason = heuristic_reason(inst)
                if reason is None:
                    score, closest = novelty.check(inst)
                    st["similarities"].append(round(score, 4))
                    if score >= self.cfg.novelty_threshold:
                        reason = f"rouge-l: {score:.3f} to {closest!r}"
                if reason is not None:
                    st["rejects"].append({"instruction": inst, "input": "", "output": "", "reason": reason,
                                          "round": st["round"]})
                    continue
                novelty.add(inst)  # later candidates of this round are compared with it too
                new.append((inst, clf_hint))
        return new, counts

    def _add_instances(self, new: list[tuple[str, bool]], clf_shots: list[Seed], zh_seeds: bool, st: dict,
                       counts: Counter) -> None:
        """Classify the new instructions, ask for their instances, and keep those that hold together."""
        clf_replies = self.client.complete([classification_prompt(clf_shots, i, zh_seeds) for i, _ in new],
                                           Sampling(temperature=0.0, max_tokens=4))
        kinds = [parse_yes(r[0].text) for r in clf_replies]
        kinds = [hint if k is None else k for k, (_, hint) in zip(kinds, new)]
        shots_c = [s for s in self.seeds if s.is_classification][:self.cfg.instance_shots]
        shots_g = [s for s in self.seeds if not s.is_classification][:self.cfg.instance_shots]
        inst_replies = self.client.complete(
            [instance_prompt(shots_c if c else shots_g, i, c) for (i, _), c in zip(new, kinds)],
            self._sampling(self.cfg.max_tokens))
        for (inst, _), clf, reply in zip(new, kinds, inst_replies):
            instances = self._instances(inst, clf, reply[0], shots_g, st)
            if instances is None:
                continue
            seen = set()
            for x in instances:
                if (x["input"], x["output"]) in seen:
                    continue
                seen.add((x["input"], x["output"]))
                st["kept"].append({"instruction": inst, "input": x["input"], "output": x["output"],
                                   "is_classification": clf, "round": st["round"]})
            counts["kept_instructions"] += 1

    def _instances(self, inst: str, clf: bool, reply, shots_g: list[Seed], st: dict) -> list[dict] | None:
        """The instances an instruction's reply holds, or None after recording why there are none to keep (a
        refused request, none parsed, only copies of a demonstration, one input with different outputs)."""
        def reject(reason: str, **more) -> None:
            st["rejects"].append({"instruction": inst, "input": "", "output": "", "round": st["round"],
                                  "reason": reason, **more})

        if reply.error:
            reject(f"request: {reply.error}")
            return None
        instances = parse_instances(reply.text, clf)
        if not clf and instances:  # a small model parrots the prompt's examples: not a new instance
            copied = [x for x in instances if copies_demonstration(x["output"], shots_g)]
            if copied and len(copied) == len(instances):
                reject("instances: repeats a demonstration's output", output=copied[0]["output"])
                return None
            instances = [x for x in instances if x not in copied]
        outputs: dict[str, set] = {}
        for x in instances:
            outputs.setdefault(x["input"], set()).add(x["output"])
        if not instances:
            reject("instances: none parsed from the reply", reply=reply.text[:500])
            return None
        if any(len(v) > 1 for v in outputs.values()):
            reject("instances: one input with different outputs")
            return None
        return instances

    def run(self, out: str, resume: bool = False, overwrite: bool = False) -> dict:
        """Rounds of generation until --num instructions are kept (or the rounds run out, or stall), resumable from
        the run directory's state; returns the run's stats."""
        from lmforge.progress import progress

        run = SynthRun(out, resume, overwrite)
        st = run.state or {"round": 0, "kept": [], "rejects": [], "similarities": [], "per_round": []}
        novelty = NoveltyFilter([s.instruction for s in self.seeds] + [k["instruction"] for k in st["kept"]])
        zh_seeds = _zh(" ".join(s.instruction for s in self.seeds))
        clf_shots = self.seeds[:self.cfg.classification_shots]
        from lmforge.synth.common import read_eval_texts

        eval_texts = read_eval_texts(self.cfg.eval_data)

        def kept_instructions() -> int:
            """Instructions that survive the data stage's checks (run on the whole set, as at the end): --num counts
            what the output will hold, and one instruction may keep several instances."""
            return len({k["instruction"] for k in data_stage_checks(st["kept"], eval_texts)[0]}) if st["kept"] else 0

        have = kept_instructions()
        bar = progress(total=self.cfg.num, initial=have, desc="self-instruct", unit="instr",
                       enabled=self.cfg.progress)
        started = time.perf_counter()
        stopped = None
        while have < self.cfg.num and st["round"] < self.cfg.max_rounds:
            rng = np.random.default_rng([self.cfg.seed, st["round"]])  # a round's draws: the same after a resume
            prompts = self.round_prompts(rng, [k["instruction"] for k in st["kept"]])
            replies = self.client.complete([p for p, _, _ in prompts], self._sampling())
            if all(r[0].error for r in replies):  # nothing can progress (e.g. every prompt exceeds the context)
                stopped = f"every request of round {st['round']} was refused: {replies[0][0].error}"
                print(f"lmforge: {stopped}", file=sys.stderr)
                for prompt, _, _ in prompts:
                    st["rejects"].append({"instruction": "", "input": prompt[-300:], "output": "",
                                          "round": st["round"], "reason": f"request: {replies[0][0].error}"})
                st["round"] += 1
                run.save_state(st)
                break
            new, counts = self._screen(prompts, replies, novelty, st)
            if new:
                self._add_instances(new, clf_shots, zh_seeds, st, counts)
            st["per_round"].append({"round": st["round"], **counts})
            st["round"] += 1
            run.save_state(st)
            have = kept_instructions()
            bar.update(max(0, have - bar.n))
            stalled = stalled_rounds(st["per_round"])
            if self.cfg.stall_rounds and stalled >= self.cfg.stall_rounds:
                stopped = (f"{stalled} rounds in a row kept nothing; most common reasons: "
                           f"{top_reasons(st['rejects'][-2000:])} (rejects/ has every one; a larger or instruction-"
                           "tuned model, a lower --novelty-threshold or more --max-tokens may help)")
                print(f"lmforge: stopping: {stopped}", file=sys.stderr)
                break
        bar.close()
        # the data stage on the instances: duplicates within the set, and overlap with a held-out eval set
        kept, dropped = data_stage_checks(st["kept"], eval_texts)
        seconds = time.perf_counter() - started
        usage = getattr(self.client, "usage", None)
        stats = run.write(kept, st["rejects"] + dropped, {
            "method": "self-instruct", "rounds": st["round"], "per_round": st["per_round"], "stopped": stopped,
            "instructions_kept": len({k["instruction"] for k in kept}), "seconds": round(seconds, 1),
            "instructions_per_minute": round(len({k["instruction"] for k in kept}) / max(seconds, 1e-9) * 60, 2),
            "tokens": usage}, st["similarities"])
        return stats

