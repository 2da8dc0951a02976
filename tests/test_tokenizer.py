import hashlib

import tiktoken

from gptpipe.tokenizer import R50K_URL, cached_path, decode, encode, encode_prompt, gpt2_encoding, tiktoken_cache_dir

# OpenAI's r50k_base.tiktoken, as tiktoken pins it (tiktoken_ext/openai_public.py)
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_gpt2_ids():
    assert encode("Hello, world") == [15496, 11, 995]
    assert encode("<|endoftext|>") == [50256]
    assert gpt2_encoding().n_vocab == 50257


def test_same_as_tiktoken_gpt2(verdict_path):
    text = verdict_path.read_text(encoding="utf-8")
    ids = encode(text)
    assert ids == tiktoken.get_encoding("gpt2").encode(text, allowed_special={"<|endoftext|>"})
    assert len(ids) == 5145
    assert decode(ids) == text


def test_offline_files_land_in_tiktokens_hash_checked_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    gpt2_encoding.cache_clear()
    for name in ("gpt2", "r50k_base"):
        tiktoken.registry.ENCODINGS.pop(name, None)
    try:
        assert tiktoken_cache_dir() == tmp_path
        assert encode("Hello, world") == [15496, 11, 995]
        # tiktoken read the data-gym files and the r50k_base file we derived from them from our
        # cache (offline it would have failed otherwise), and the latter is OpenAI's file to the byte
        assert len(list(tmp_path.iterdir())) == 3
        assert hashlib.sha256(cached_path(tmp_path, R50K_URL).read_bytes()).hexdigest() == R50K_SHA256
        assert gpt2_encoding()._mergeable_ranks == tiktoken.get_encoding("gpt2")._mergeable_ranks
        assert gpt2_encoding()._pat_str == tiktoken.get_encoding("gpt2")._pat_str
    finally:
        gpt2_encoding.cache_clear()


def test_empty_prompt_starts_a_document():
    assert encode_prompt("") == [50256]
    assert encode_prompt("Every effort") == encode("Every effort")
