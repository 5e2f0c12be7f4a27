"""Task heads: a linear classifier on an lmforge decoder or a BERT-family encoder, saved as the HF directory
transformers loads with the same logits.

    sequence  one label (or several: multi-label) per text. Decoders read the last real token's hidden state (the
              from-scratch book's spam classifier; HF `*ForSequenceClassification` picks the rightmost token that is
              not `pad_token_id`); encoders use BERT's pooler (tanh(dense([CLS])), HF-exact) or the mean of the real
              tokens ("mean": lmforge's own, transformers has no such head).
    token     one label per token (BIO tagging): HF `*ForTokenClassification`.

Saved layouts, with label2id / id2label / problem_type / pad_token_id in config.json:
  Llama-like (every family     model.* + score.weight (sequence, no bias) or score.weight + score.bias (token)
  of model/hf.py but GPT-2)
  GPT-2                        transformer.* + score.weight (sequence) or classifier.weight + .bias (token)
  BERT                         bert.* (+ bert.pooler for sequence) + classifier.weight + .bias

The class names follow each family's causal LM class (Qwen3ForCausalLM -> Qwen3ForSequenceClassification);
Gemma 3's text-only classes are Gemma3Text*. transformers has no token classifier for Gemma 3 and OLMo 2, so
lmforge refuses those heads rather than save a directory nothing loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.encoder import Encoder, EncoderConfig, encoder_hf_tensors, load_hf_encoder
from lmforge.model.hf import (
    HF_CLASS,
    CheckpointError,
    config_to_hf,
    hf_tensors,
    read_state_dict,
    transformer_from_tensors,
)

TASKS = ("sequence", "token")
HEAD_SUFFIX = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}
# the stem of each family's HF class names: its causal LM class's (Gemma 3's text-only model is Gemma3Text*)
ARCH_PREFIX = {**{arch: cls.removesuffix("ForCausalLM").removesuffix("LMHeadModel") for arch, cls in HF_CLASS.items()},
               "gemma3_text": "Gemma3Text", "bert": "Bert"}
# heads transformers (5.x) has no class for
NO_HF_CLASS = {("gemma3_text", "token"), ("olmo2", "token")}


class Classifier(nn.Module):
    """backbone (Transformer or Encoder) + dropout + linear head; `forward(input_ids, attention_mask)` returns
    logits (B, num_labels) for task "sequence" or (B, T, num_labels) for "token". Batches are right-padded."""

    def __init__(self, backbone: nn.Module, labels: list[str], task: str = "sequence", pooling: str | None = None,
                 multi_label: bool = False, pad_token_id: int = 0, dropout: float = 0.1):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task {task!r}: one of {', '.join(TASKS)}")
        self.backbone, self.task, self.labels = backbone, task, list(labels)
        self.encoder = isinstance(backbone, Encoder)
        self.pooling = pooling or ("cls" if self.encoder else "last")
        valid = ("cls", "mean") if self.encoder else ("last",)
        if task == "sequence" and self.pooling not in valid:
            raise ValueError(f"pooling {self.pooling!r}: a {'encoder' if self.encoder else 'decoder'} pools by "
                             f"{' or '.join(valid)}")
        self.multi_label, self.pad_token_id = multi_label, pad_token_id
        d = backbone.cfg.d_model
        self.pooler = nn.Linear(d, d) if self.encoder and task == "sequence" and self.pooling == "cls" else None
        # HF's decoder sequence heads have no bias; its token heads and BERT's classifier do
        self.head = nn.Linear(d, len(labels), bias=self.encoder or task == "token")
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        self.dropout = nn.Dropout(dropout)
        if not self.encoder and backbone.lm_head is not None:
            backbone.lm_head.requires_grad_(False)  # the LM head is not used by a classifier

    @property
    def cfg(self):
        """The backbone's config (the Trainer reads n_layers, n_experts, flops_per_token from it)."""
        return self.backbone.cfg

    @property
    def layers(self):
        return self.backbone.layers

    def aux_loss(self) -> torch.Tensor:
        return self.backbone.aux_loss() if not self.encoder else torch.zeros(())

    def router_balance(self) -> dict[str, float]:
        return self.backbone.router_balance() if not self.encoder else {}

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's last hidden states (B, T, d_model): an encoder's, or a decoder's after its final norm."""
        return self.backbone(input_ids, attention_mask=attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.hidden(input_ids, attention_mask)
        if self.task == "token":
            return self.head(self.dropout(h))
        if self.pooling == "last":  # the last real token of each right-padded row
            last = (attention_mask.long().sum(1) - 1).clamp(min=0)
            pooled = h[torch.arange(len(h), device=h.device), last]
        elif self.pooling == "mean":
            m = attention_mask[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.head(self.dropout(pooled))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else F.softmax(logits, dim=-1)

    # --- HF directories ---------------------------------------------------------------------------------------
    def hf_architecture(self) -> str:
        arch = "bert" if self.encoder else self.backbone.cfg.arch
        return ARCH_PREFIX[arch] + HEAD_SUFFIX[self.task]

    def hf_config(self) -> dict:
        base = encoder_config_to_hf(self.backbone.cfg) if self.encoder else config_to_hf(self.backbone.cfg)
        out = {**base, "architectures": [self.hf_architecture()], "pad_token_id": self.pad_token_id,
               "id2label": {str(i): label for i, label in enumerate(self.labels)},
               "label2id": {label: i for i, label in enumerate(self.labels)},
               "lmforge_task": {"task": self.task, "pooling": self.pooling}}
        if self.task == "sequence":
            # one output is a score (a reward model, a regression head), which transformers calls regression: it
            # refuses single_label_classification with one label
            out["problem_type"] = ("multi_label_classification" if self.multi_label else
                                   "regression" if getattr(self, "regression", False) or len(self.labels) == 1 else
                                   "single_label_classification")
        return out

    def hf_state(self) -> dict[str, torch.Tensor]:
        """The HF tensors: the backbone's and the head's. A backbone with an adapter merges it first (in a copy:
        lmforge.peft.merge), or hf_tensors refuses it."""
        backbone = self.backbone
        if self.encoder:
            out = encoder_hf_tensors(backbone, prefix="bert.")
            if self.pooler is not None:
                out["bert.pooler.dense.weight"] = self.pooler.weight
                out["bert.pooler.dense.bias"] = self.pooler.bias
            head = "classifier"
        else:
            out = {k: v for k, v in hf_tensors(backbone).items() if k != "lm_head.weight"}
            head = "classifier" if backbone.cfg.arch == "gpt2" and self.task == "token" else "score"
        out[f"{head}.weight"] = self.head.weight
        if self.head.bias is not None:
            out[f"{head}.bias"] = self.head.bias
        return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + model.safetensors, written whole into place (files.StagedDirectory)."""
        from lmforge.files import StagedDirectory, save_tensors, write_json

        with StagedDirectory(directory) as stage:
            save_tensors(self.hf_state(), stage.path("model.safetensors"), metadata={"format": "pt"})
            write_json(stage.path("config.json"), self.hf_config())

    def load_state_from(self, directory: str | os.PathLike) -> None:
        """Every weight from a directory this class saved (resuming a run)."""
        other = load_classifier(directory)
        self.backbone.load_state_dict(other.backbone.state_dict(), strict=False)
        self.head.load_state_dict(other.head.state_dict())
        if self.pooler is not None and other.pooler is not None:
            self.pooler.load_state_dict(other.pooler.state_dict())


def encoder_config_to_hf(cfg: EncoderConfig) -> dict:
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.d_ff, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.attention_dropout, "max_position_embeddings": cfg.max_seq_len,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_token_id,
            "position_embedding_type": "absolute", "torch_dtype": "float32"}


def is_encoder_dir(directory: str | os.PathLike) -> bool:
    path = Path(directory) / "config.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("model_type") == "bert"


def build_classifier(directory: str | os.PathLike, labels: list[str], task: str = "sequence",
                     pooling: str | None = None, multi_label: bool = False, pad_token_id: int | None = None,
                     dropout: float = 0.1) -> Classifier:
    """A new head (random, std 0.02) on the backbone of an HF directory: a causal LM lmforge loads, or a BERT-family
    encoder (a sentence-transformers directory too); its pooler is kept where the checkpoint has one."""
    from lmforge.model.hf import load_hf_model, resolve_model_dir

    d = resolve_model_dir(directory)
    if is_encoder_dir(d):
        backbone = load_hf_encoder(d)
        pad = backbone.cfg.pad_token_id if pad_token_id is None else pad_token_id
        model = Classifier(backbone, labels, task, pooling, multi_label, pad, dropout)
        tensors = read_state_dict(d)
        key = next((k for k in ("bert.pooler.dense.weight", "pooler.dense.weight") if k in tensors), None)
        if model.pooler is not None and key is not None:
            model.pooler.load_state_dict({"weight": tensors[key], "bias": tensors[key.replace("weight", "bias")]})
        return model
    backbone = load_hf_model(d, portable=False)  # a head sits on lmforge's own decoder
    if (backbone.cfg.arch, task) in NO_HF_CLASS:
        raise CheckpointError(f"{d}: transformers has no {ARCH_PREFIX[backbone.cfg.arch]}{HEAD_SUFFIX[task]}, so a "
                              f"{task} classifier on this {backbone.cfg.arch} model could not be saved as a directory "
                              "that loads; use task sequence, or another family")
    pad = pad_token_id if pad_token_id is not None else (backbone.cfg.eos_token_id or 0)
    return Classifier(backbone, labels, task, pooling, multi_label, pad, dropout)


def load_classifier(directory: str | os.PathLike) -> Classifier:
    """A `*ForSequenceClassification` / `*ForTokenClassification` directory (lmforge's, or one transformers wrote for
    a supported family) as a Classifier in eval mode."""
    from lmforge.model.hf import config_from_hf, read_config, resolve_model_dir

    d = resolve_model_dir(directory)
    raw = read_config(d)
    arch = (raw.get("architectures") or [""])[0]
    task = next((t for t, suffix in HEAD_SUFFIX.items() if arch.endswith(suffix)), None)
    if task is None:
        raise CheckpointError(f"{d}: architectures {raw.get('architectures')} is not a sequence or token classifier "
                              "(train one with `lmforge classify train`)")
    n = len(raw.get("id2label") or {}) or raw.get("num_labels", 2)
    id2label = raw.get("id2label") or {str(i): f"LABEL_{i}" for i in range(n)}
    labels = [id2label[str(i)] for i in range(len(id2label))]
    meta = raw.get("lmforge_task") or {}
    multi = raw.get("problem_type") == "multi_label_classification"
    tensors = read_state_dict(d)
    if raw.get("model_type") == "bert":
        backbone = Encoder(EncoderConfig.from_hf(raw, str(d / "config.json")))
        stripped = {k.removeprefix("bert."): v for k, v in tensors.items()}
        from lmforge.model.encoder import encoder_state_from_hf

        backbone.load_state_dict(encoder_state_from_hf(stripped, backbone.cfg, d))
        model = Classifier(backbone, labels, task, meta.get("pooling", "cls"), multi, raw.get("pad_token_id") or 0)
        if model.pooler is not None:
            model.pooler.load_state_dict({"weight": tensors["bert.pooler.dense.weight"],
                                          "bias": tensors["bert.pooler.dense.bias"]})
        head = "classifier"
    else:
        cfg = config_from_hf(raw, str(d / "config.json"))
        head = "classifier" if cfg.arch == "gpt2" and task == "token" else "score"
        body = {k: v for k, v in tensors.items() if not k.startswith(head + ".")}
        backbone = transformer_from_tensors(cfg, body, d, head_optional=True)
        model = Classifier(backbone, labels, task, None, multi, raw.get("pad_token_id") or 0)
    if f"{head}.weight" not in tensors:
        raise CheckpointError(f"{d}: tensor '{head}.weight' (the classification head) is missing")
    model.head.weight.data.copy_(tensors[f"{head}.weight"])
    if model.head.bias is not None:
        if f"{head}.bias" not in tensors:
            raise CheckpointError(f"{d}: tensor '{head}.bias' is missing")
        model.head.bias.data.copy_(tensors[f"{head}.bias"])
    model.regression = raw.get("problem_type") == "regression"
    return model.eval()
