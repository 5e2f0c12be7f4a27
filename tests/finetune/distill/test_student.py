"""`lmforge distill init`: a student cut from a teacher loads in transformers with the logits of a reference built
by hand (a transformers model of fewer layers with the chosen layers' weights copied in), for Llama, GPT-2 and a
Qwen3 with a per-layer attention pattern."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.finetune.distill.student import cut_student
from lmforge.model import load_hf_model


def _teacher(kind: str, path):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=4, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                                       sliding_window=4, max_window_layers=2,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                    "full_attention"])
        model = transformers.Qwen3ForCausalLM(cfg)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")  # any file beside the weights is copied
    return model.eval()


def _reference(teacher, keep):
    """The teacher's class with len(keep) layers, each layer's weights copied from the teacher's keep[j]."""
    cfg = teacher.config.to_dict()
    key = "n_layer" if "n_layer" in cfg else "num_hidden_layers"
    cfg[key] = len(keep)
    if "layer_types" in cfg and cfg["layer_types"]:
        cfg["layer_types"] = [cfg["layer_types"][i] for i in keep]
    ref = type(teacher)(type(teacher.config).from_dict(cfg)).eval()
    blocks_t = teacher.transformer.h if key == "n_layer" else teacher.model.layers
    blocks_r = ref.transformer.h if key == "n_layer" else ref.model.layers
    for j, i in enumerate(keep):
        blocks_r[j].load_state_dict(blocks_t[i].state_dict())
    rest = {k: v for k, v in teacher.state_dict().items() if ".h." not in k and ".layers." not in k}
    missing, unexpected = ref.load_state_dict(rest, strict=False)
    assert not unexpected and all(".h." in k or ".layers." in k for k in missing)
    return ref


@pytest.mark.parametrize("kind,keep", [("llama", [0, 2, 4]), ("gpt2", [1, 3]), ("qwen3", [0, 1, 3])])
def test_student_equals_a_hand_built_reference(kind, keep, tmp_path):
    teacher = _teacher(kind, tmp_path / "teacher")
    info = cut_student(tmp_path / "teacher", tmp_path / "student", layers=keep)
    assert info["layers"] == len(keep) and info["kept"] == keep
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ref = _reference(teacher, keep)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = student(ids).logits, ref(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (tmp_path / "student" / "tokenizer.json").exists()
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    ours = load_hf_model(tmp_path / "student")  # lmforge loads it too, with the same logits
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - want).abs().max() <= 1e-4


def test_keep_every_and_bad_choices_through_the_cli(tmp_path, capsys):
    _teacher("llama", tmp_path / "teacher")
    assert main(["distill", "init", "--teacher", str(tmp_path / "teacher"), "--keep-every", "2", "--out",
                 str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 3  # blocks 0, 2, 4
    capsys.readouterr()
    assert main(["distill", "init", "--teacher", str(tmp_path / "teacher"), "--layers", "0,7", "--out",
                 str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "7 not in 0..4" in err
    assert main(["distill", "init", "--teacher", str(tmp_path / "teacher"), "--layers", "2,1", "--out",
                 str(tmp_path / "t")]) == 2
    assert main(["distill", "init", "--teacher", str(tmp_path / "teacher"), "--keep-every", "2", "--out",
                 str(tmp_path / "s")]) == 2  # not empty
    assert not (tmp_path / "t").exists()


def _phi3_teacher(path):
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(cfg)
    model.save_pretrained(path)
    return model.eval()


def _kill_neurons(model, kind: str, dead: list[int]) -> None:
    """Zero the output weights of `dead` intermediate neurons in every block: they then add nothing to any output."""
    with torch.no_grad():
        for block in (model.transformer.h if kind == "gpt2" else model.model.layers):
            if kind == "gpt2":
                block.mlp.c_proj.weight[dead] = 0  # Conv1D: (F, D)
            else:
                block.mlp.down_proj.weight[:, dead] = 0


@pytest.mark.parametrize("kind", ["llama", "gpt2", "phi3"])
def test_width_pruning_drops_exactly_the_neurons_that_add_nothing(kind, tmp_path):
    """--d-ff: with the output weights of some intermediate neurons zeroed in the teacher (they contribute nothing),
    a student narrowed to the live ones has the teacher's logits in transformers, and config.json says its width:
    the importance score keeps every live neuron and only those (Llama's gate/up/down, GPT-2's Conv1D, Phi-3's fused
    gate_up)."""
    teacher = _phi3_teacher(tmp_path / "t0") if kind == "phi3" else _teacher(kind, tmp_path / "t0")
    width = 4 * 32 if kind == "gpt2" else 64
    dead = list(range(1, width, 3))
    _kill_neurons(teacher, kind, dead)
    teacher.save_pretrained(tmp_path / "teacher")
    info = cut_student(tmp_path / "teacher", tmp_path / "student", d_ff=width - len(dead))
    assert info["layers"] == info["teacher_layers"] and info["d_ff"] == width - len(dead)
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["n_inner" if kind == "gpt2" else "intermediate_size"] == width - len(dead)
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)
        mine = load_hf_model(tmp_path / "student")
        torch.testing.assert_close(mine.logits(mine(ids)), teacher(ids).logits, atol=1e-4, rtol=1e-4)
    assert info["parameters"] < info["teacher_parameters"]


def test_width_pruning_refuses_what_it_cannot_narrow(tmp_path, capsys):
    _teacher("llama", tmp_path / "teacher")
    assert main(["distill", "init", "--teacher", str(tmp_path / "teacher"), "--d-ff", "65", "--out",
                 str(tmp_path / "s")]) == 2
    assert "d_ff: 65 is not in 1..64" in capsys.readouterr().err
    torch.manual_seed(0)
    moe = transformers.Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16)
    transformers.Qwen3MoeForCausalLM(moe).save_pretrained(tmp_path / "moe")
    assert main(["distill", "init", "--teacher", str(tmp_path / "moe"), "--d-ff", "32", "--out",
                 str(tmp_path / "s2")]) == 2
    assert "experts: --d-ff narrows dense MLPs only" in capsys.readouterr().err


def _calibration_texts() -> list[str]:
    from tests.corpora import chinese_news, english

    words = english(6_000).split()
    texts = [" ".join(words[i:i + 40 + 7 * (i % 5)]) for i in range(0, 600, 60)]
    news = chinese_news(2_000)
    return [t for pair in zip(texts, [news[i:i + 90] for i in range(0, 900, 90)]) for t in pair]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_activation_pruning_keeps_the_neurons_most_active_on_the_calibration_text(kind, trained_dir, tmp_path):
    """--prune-by activation: measured independently (transformers' tokenizer and model, hooks at the MLP's output
    projection, each document one row, the first T tokens), each intermediate neuron's mean |activation|; the
    student keeps exactly the top N of those in every block, and in transformers its logits equal the teacher's with
    every other neuron's output weights zeroed."""
    import shutil

    vocab = transformers.PreTrainedTokenizerFast(tokenizer_file=str(trained_dir / "tokenizer.json"))
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        teacher, width, window = transformers.LlamaForCausalLM(cfg).eval(), 64, 512
    else:
        cfg = transformers.GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=48)
        teacher, width, window = transformers.GPT2LMHeadModel(cfg).eval(), 128, 48  # rows within its 48 positions
    teacher.save_pretrained(tmp_path / "teacher")
    for f in trained_dir.iterdir():
        shutil.copy(f, tmp_path / "teacher" / f.name)
    texts = _calibration_texts()
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                          encoding="utf-8")
    budget = 300  # tokens: the documents hold more, so the last row is cut short
    rows, seen = [], 0
    for text in texts:
        ids = vocab(text, add_special_tokens=False)["input_ids"][:min(window, budget - seen)]
        rows.append(ids)
        seen += len(ids)
        if seen >= budget:
            break
    assert seen == budget and len(rows) > 2
    blocks = teacher.transformer.h if kind == "gpt2" else teacher.model.layers
    outputs = [b.mlp.c_proj if kind == "gpt2" else b.mlp.down_proj for b in blocks]
    sums = [torch.zeros(width, dtype=torch.float64) for _ in blocks]

    def record(i, module, inputs):  # returns None: the module's input is left as it is
        sums[i] += inputs[0].abs().double().sum((0, 1))

    hooks = [m.register_forward_pre_hook(partial(record, i)) for i, m in enumerate(outputs)]
    with torch.no_grad():
        for ids in rows:
            teacher(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    d_ff = width // 2 + 3
    keep = []
    for s in sums:
        ranked = (s / budget).sort(descending=True).values
        assert ranked[d_ff - 1] - ranked[d_ff] > 1e-6 * ranked[0]  # a clear cut: the expected set is well defined
        keep.append((s / budget).topk(d_ff).indices.sort().values)
    info = cut_student(tmp_path / "teacher", tmp_path / "student", d_ff=d_ff, prune_by="activation",
                       calib_data=[str(tmp_path / "calib.jsonl")], calib_tokens=budget)
    assert info["prune_by"] == "activation" and info["d_ff"] == d_ff
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    s_blocks = student.transformer.h if kind == "gpt2" else student.model.layers
    with torch.no_grad():
        for b, (t_out, s_block) in enumerate(zip(outputs, s_blocks)):
            if kind == "gpt2":
                torch.testing.assert_close(s_block.mlp.c_proj.weight, t_out.weight[keep[b]], rtol=0, atol=0)
                t_out.weight[[i for i in range(width) if i not in keep[b].tolist()]] = 0
            else:
                torch.testing.assert_close(s_block.mlp.down_proj.weight, t_out.weight[:, keep[b]], rtol=0, atol=0)
                t_out.weight[:, [i for i in range(width) if i not in keep[b].tolist()]] = 0
        ids = torch.tensor([rows[0][:16], rows[1][:16]])
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)


def test_activation_pruning_needs_its_data(tmp_path, capsys):
    _teacher("llama", tmp_path / "teacher")
    teacher = str(tmp_path / "teacher")
    assert main(["distill", "init", "--teacher", teacher, "--d-ff", "32", "--prune-by", "activation",
                 "--out", str(tmp_path / "s")]) == 2
    assert "calib_data: --prune-by activation measures activations on text" in capsys.readouterr().err
    assert main(["distill", "init", "--teacher", teacher, "--keep-every", "2", "--prune-by", "activation",
                 "--calib-data", "x.txt", "--out", str(tmp_path / "s")]) == 2
    assert "give --d-ff N too" in capsys.readouterr().err
