import tiktoken

from gptpipe.tokenizer import decode, encode, encode_prompt, gpt2_encoding, tiktoken_cache_dir


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
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    try:
        assert tiktoken_cache_dir() == tmp_path
        assert encode("Hello, world") == [15496, 11, 995]
        # tiktoken read both files from our cache (it would have failed offline otherwise)
        assert len(list(tmp_path.iterdir())) == 2
    finally:
        gpt2_encoding.cache_clear()


def test_empty_prompt_starts_a_document():
    assert encode_prompt("") == [50256]
    assert encode_prompt("Every effort") == encode("Every effort")
