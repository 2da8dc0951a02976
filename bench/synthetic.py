"""A seeded synthetic corpus for the data benchmarks: English-like text of a chosen size.

Words are GPT-2's own whole-word tokens (" the", " painter", ...), drawn with Zipf weights
by their BPE rank (frequent merges first), with sentence ends and paragraph breaks. Two
shapes: one text file of documents of about 12 kB joined by <|endoftext|> (write_corpus), or
separate documents of about 1-4 kB, as rows of a dataset (documents). Made in pieces, never
held whole.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gptpipe.tokenizer import END_OF_TEXT, gpt2_encoding

WORDS_PER_PIECE = 1 << 18
# What follows a word, and how often: mostly nothing (the next word brings its own space).
ENDINGS = {"": 0.85, ",": 0.06, ".": 0.075, ".\n\n": 0.0145, "." + END_OF_TEXT: 0.0005}
# Documents of a dataset: lognormal lengths, median 2 kB, most between 1.2 and 3.3 kB (one
# sigma), as TinyStories' stories (~0.9 kB) and FineWeb's pages (~3-4 kB) go.
DOCUMENT_MEDIAN_BYTES = 2000
DOCUMENT_SIGMA = 0.5
DOCUMENT_BYTES = (200, 20000)


def vocabulary() -> list[str]:
    """GPT-2's tokens that are a space and a lowercase word, in rank order."""
    encoding = gpt2_encoding()
    words = []
    for rank in range(encoding.n_vocab - 1):
        token = encoding.decode_single_token_bytes(rank)
        if re.fullmatch(rb" [a-z]{2,}", token):
            words.append(token.decode())
    return words


def text_pieces(rng: np.random.Generator, endings: dict[str, float]) -> Iterator[str]:
    """Endless pieces of WORDS_PER_PIECE words, each followed by one of `endings` (weights)."""
    words = np.array(vocabulary(), dtype=object)
    weights = 1.0 / (np.arange(len(words)) + 10.0)  # Zipf over the BPE rank
    weights /= weights.sum()
    ending_texts = np.array(list(endings), dtype=object)
    ending_weights = np.array(list(endings.values()))
    ending_weights /= ending_weights.sum()
    while True:
        interleaved = np.empty(2 * WORDS_PER_PIECE, dtype=object)
        interleaved[0::2] = words[rng.choice(len(words), WORDS_PER_PIECE, p=weights)]
        interleaved[1::2] = ending_texts[rng.choice(len(ending_texts), WORDS_PER_PIECE, p=ending_weights)]
        yield "".join(interleaved)


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> Path:
    """Write `n_bytes` of synthetic text (a few less: it ends at a word) to `path`."""
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("It")
        for piece in text_pieces(np.random.default_rng(seed), ENDINGS):
            if written >= n_bytes:
                break
            if written + len(piece) > n_bytes:  # end before the word that would pass n_bytes
                piece = piece[:max(piece.rfind(" ", 0, n_bytes - written), 0)]
            f.write(piece)
            written += len(piece) or n_bytes  # ASCII: characters are bytes
    return path


def documents(n_bytes: int, seed: int = 0) -> Iterator[str]:
    """Separate documents (no <|endoftext|> in them) of about n_bytes in all, each a run of
    sentences that starts with a capital and ends with a full stop."""
    rng = np.random.default_rng(seed)
    endings = {k: v for k, v in ENDINGS.items() if END_OF_TEXT not in k}
    pieces = text_pieces(rng, endings)
    text, at, written = "", 0, 0
    while written < n_bytes:
        length = int(np.clip(rng.lognormal(np.log(DOCUMENT_MEDIAN_BYTES), DOCUMENT_SIGMA), *DOCUMENT_BYTES))
        while (end := text.find(".", at + length)) < 0:
            text = text[at:] + next(pieces)
            at = 0
        document = text[at:end + 1].strip()
        at = end + 1
        document = document[:1].upper() + document[1:]
        written += len(document)  # ASCII: characters are bytes
        yield document
