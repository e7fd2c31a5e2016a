"""Small offline encoders for `fusemoe embed` (tests, docs, a baseline): nothing downloads weights.

An encoder is any callable taking a list (batch) of raw items and returning a [batch, width] float
array (numpy or torch); `fusemoe embed --encoder module:function` loads one by name.
"""

from __future__ import annotations

import numpy as np

HASHING_WIDTH = 64


def hashing_text(texts: list[str], width: int = HASHING_WIDTH) -> np.ndarray:
    """Bag-of-words hashed into `width` buckets, L2-normalised, float32 ([batch, width]).

    Stateless (no vocabulary to fit), so every batch and every rerun encodes a note the same way;
    a text without tokens is the zero vector. Wrap it (functools.partial) for another width."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectoriser = HashingVectorizer(n_features=width, alternate_sign=False, norm="l2")
    return vectoriser.transform(texts).toarray().astype(np.float32)
