"""Sentence embeddings for prompts: all-MiniLM-L6-v2 run in plain numpy.

The weights are found, or fetched once, by `weights.resolve`. We run the six BERT layers
ourselves instead of importing torch / sentence-transformers: those take seconds and
hundreds of megabytes to import, while a short prompt needs only a few milliseconds of
matrix work. The output matches sentence-transformers (mean pooling, L2 normalised).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from importlib.resources.abc import Traversable

import numpy as np
from safetensors.numpy import load as load_safetensors
from tokenizers import Tokenizer

from .weights import resolve

log = logging.getLogger(__name__)

DIM = 384
#: Texts are embedded in batches of similar length, so short ones are not padded to long ones.
BATCH = 32
#: OpenBLAS runs a product of at most this many multiply-adds on one thread (its
#: SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD); see `_dense`.
_SINGLE_THREAD_MACS = 65536 * 4
#: Up to this many tokens in a batch, products are kept single-threaded.
_SHORT_INPUT = 64

_lock = threading.Lock()
_loaded: TextEncoder | None = None


def model_dir() -> Traversable:
    """The model folder: the user's, installed, cached, or fetched now (`weights.resolve`)."""
    return resolve()


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU as BERT uses it; numpy has no erf, so Abramowitz-Stegun 7.1.26.

    That approximation is within 1.5e-7 of erf. With q = Phi(-|x|) computed from it,
    Phi(x) is 1 - q for x >= 0 and q otherwise; the work is done in place to save memory.
    """
    a = np.abs(x) * np.float32(1.0 / math.sqrt(2.0))
    t = a * np.float32(0.3275911)
    t += 1.0
    np.reciprocal(t, out=t)
    q = t * np.float32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        q += np.float32(c)
        q *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    q *= a
    q *= 0.5
    phi = np.where(x >= 0, 1.0 - q, q)
    phi *= x
    return phi


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


def _dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x @ weight.T + bias for x (tokens, in) and weight (out, in), as torch stores it.

    Written as weight @ x.T: for the few tokens of a prompt OpenBLAS runs this form about
    1.7x faster than x @ weight.T (measured). For short inputs the product is also cut into
    row blocks small enough that OpenBLAS keeps each on the calling thread: its worker
    threads, on a machine busy with video, made 1 call in 10 take 200 ms instead of 10 ms.
    """
    tokens, inputs = x.shape
    rows = _SINGLE_THREAD_MACS // (tokens * inputs)
    if tokens > _SHORT_INPUT or rows >= weight.shape[0]:
        return (weight @ x.T).T + bias
    rows = max(rows, 8)
    xt = x.T
    out = np.empty((weight.shape[0], tokens), dtype=np.float32)
    for start in range(0, weight.shape[0], rows):
        np.matmul(weight[start : start + rows], xt, out=out[start : start + rows])
    return out.T + bias


class _Layer:
    """One transformer block's weights, with query, key and value fused into one matrix."""

    def __init__(self, w: dict[str, np.ndarray], prefix: str) -> None:
        def get(name: str) -> np.ndarray:
            return np.ascontiguousarray(w[prefix + name], dtype=np.float32)

        att = "attention.self."
        self.qkv_w = np.concatenate([get(att + n + ".weight") for n in ("query", "key", "value")])
        self.qkv_b = np.concatenate([get(att + n + ".bias") for n in ("query", "key", "value")])
        self.out_w = get("attention.output.dense.weight")
        self.out_b = get("attention.output.dense.bias")
        self.ln1_w = get("attention.output.LayerNorm.weight")
        self.ln1_b = get("attention.output.LayerNorm.bias")
        self.ff1_w = get("intermediate.dense.weight")
        self.ff1_b = get("intermediate.dense.bias")
        self.ff2_w = get("output.dense.weight")
        self.ff2_b = get("output.dense.bias")
        self.ln2_w = get("output.LayerNorm.weight")
        self.ln2_b = get("output.LayerNorm.bias")


class TextEncoder:
    """all-MiniLM-L6-v2: text in, unit-length 384-d float32 vectors out."""

    def __init__(self, tokenizer: Tokenizer, weights: dict[str, np.ndarray], config: dict) -> None:
        self.tokenizer = tokenizer
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.max_length = int(config["max_seq_length"])
        self.word = np.ascontiguousarray(weights["embeddings.word_embeddings.weight"])
        self.position = np.ascontiguousarray(weights["embeddings.position_embeddings.weight"])
        self.token_type = np.ascontiguousarray(weights["embeddings.token_type_embeddings.weight"])
        self.emb_ln_w = weights["embeddings.LayerNorm.weight"]
        self.emb_ln_b = weights["embeddings.LayerNorm.bias"]
        self.layers = [
            _Layer(weights, f"encoder.layer.{i}.") for i in range(int(config["num_hidden_layers"]))
        ]

    @classmethod
    def load(cls) -> TextEncoder:
        """The process-wide encoder, read from `model_dir()` on first use.

        Raises `weights.WeightsUnavailable` when the weights are not here and cannot be
        fetched; a later call tries again (see `weights.RETRY_AFTER`)."""
        global _loaded
        with _lock:
            if _loaded is None:
                _loaded = cls.from_folder(model_dir())
            return _loaded

    @classmethod
    def from_folder(cls, folder: Traversable) -> TextEncoder:
        config = json.loads(folder.joinpath("config.json").read_text())
        st_config = json.loads(folder.joinpath("sentence_bert_config.json").read_text())
        # sentence-transformers truncates at its own max_seq_length (256), not tokenizer.json's
        config["max_seq_length"] = min(
            int(st_config.get("max_seq_length", 512)), int(config["max_position_embeddings"])
        )
        tokenizer = Tokenizer.from_str(folder.joinpath("tokenizer.json").read_text())
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=config["max_seq_length"])
        weights = load_safetensors(folder.joinpath("model.safetensors").read_bytes())
        log.info("loaded text encoder from %s (%d tokens max)", folder, config["max_seq_length"])
        return cls(tokenizer, weights, config)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed each text: (n, 384) float32, rows of unit length."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings; wrap a single prompt in a list")
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            out[rows] = self._embed([encodings[i].ids for i in rows])
        return out

    def _embed(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        length = max(len(ids) for ids in token_ids)
        ids = np.zeros((len(token_ids), length), dtype=np.int64)
        mask = np.zeros((len(token_ids), length), dtype=np.float32)
        for row, row_ids in enumerate(token_ids):
            ids[row, : len(row_ids)] = row_ids
            mask[row, : len(row_ids)] = 1.0
        hidden = self._forward(ids, mask)
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n, length = ids.shape
        heads = self.heads
        x = self.word[ids] + self.position[:length] + self.token_type[0]
        dim = x.shape[-1]
        head_dim = dim // heads
        x = _layer_norm(x.reshape(n * length, dim), self.emb_ln_w, self.emb_ln_b, self.eps)
        scale = np.float32(1.0 / math.sqrt(head_dim))
        # padded keys get a huge negative score, so softmax gives them no weight
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        for layer in self.layers:
            qkv = _dense(x, layer.qkv_w, layer.qkv_b)
            qkv = qkv.reshape(n, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(n * length, dim)
            attended = _dense(context, layer.out_w, layer.out_b) + x
            x = _layer_norm(attended, layer.ln1_w, layer.ln1_b, self.eps)
            hidden = _gelu(_dense(x, layer.ff1_w, layer.ff1_b))
            x = _layer_norm(
                _dense(hidden, layer.ff2_w, layer.ff2_b) + x, layer.ln2_w, layer.ln2_b, self.eps
            )
        return x.reshape(n, length, dim)
