"""A seeded synthetic corpus for the data benchmarks: English-like text of a chosen size.

Words are GPT-2's own whole-word tokens (" the", " painter", ...), drawn with Zipf weights
by their BPE rank (frequent merges first), with sentence ends, paragraph breaks and
documents of about 12 kB joined by <|endoftext|>. Written in pieces, never held whole.
"""

import re
from pathlib import Path

import numpy as np

from gptpipe.tokenizer import END_OF_TEXT, gpt2_encoding

WORDS_PER_PIECE = 1 << 18
# What follows a word, and how often: mostly nothing (the next word brings its own space).
ENDINGS = ["", ",", ".", ".\n\n", "." + END_OF_TEXT]
ENDING_WEIGHTS = [0.85, 0.06, 0.075, 0.0145, 0.0005]


def vocabulary() -> list[str]:
    """GPT-2's tokens that are a space and a lowercase word, in rank order."""
    encoding = gpt2_encoding()
    words = []
    for rank in range(encoding.n_vocab - 1):
        token = encoding.decode_single_token_bytes(rank)
        if re.fullmatch(rb" [a-z]{2,}", token):
            words.append(token.decode())
    return words


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> Path:
    """Write `n_bytes` of synthetic text (a few less: it ends at a word) to `path`."""
    words = np.array(vocabulary(), dtype=object)
    weights = 1.0 / (np.arange(len(words)) + 10.0)  # Zipf over the BPE rank
    weights /= weights.sum()
    endings = np.array(ENDINGS, dtype=object)
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("It")
        while written < n_bytes:
            interleaved = np.empty(2 * WORDS_PER_PIECE, dtype=object)
            interleaved[0::2] = words[rng.choice(len(words), WORDS_PER_PIECE, p=weights)]
            interleaved[1::2] = endings[rng.choice(len(endings), WORDS_PER_PIECE, p=ENDING_WEIGHTS)]
            piece = "".join(interleaved)
            if written + len(piece) > n_bytes:  # end before the word that would pass n_bytes
                piece = piece[:max(piece.rfind(" ", 0, n_bytes - written), 0)]
            f.write(piece)
            written += len(piece) or n_bytes  # ASCII: characters are bytes
    return path
