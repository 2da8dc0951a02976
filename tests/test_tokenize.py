"""Streaming tokenize: the same ids as one-shot encoding, safe chunk cuts, splits by characters
and by document, the test split, and bounded memory. (File formats and the Hub: test_corpora.py.)"""

import json
import random
import tracemalloc

import numpy as np
import pytest
import tiktoken

from conftest import ROOT, write_params
from gptpipe import corpus, documents
from gptpipe.corpus import SAFE_CUT, cut_chunks, tokenize_corpus
from gptpipe.errors import PipelineError
from gptpipe.params import load_params
from gptpipe.tokenizer import token_byte_lengths

EOT = "<|endoftext|>"
GPT2 = tiktoken.get_encoding("gpt2")


def one_shot(text: str) -> list[int]:
    """Encoding the whole text in one call, a literal <|endoftext|> as text."""
    return GPT2.encode_ordinary(text)


def by_document(docs: list[str]) -> list[int]:
    """Each document's ids followed by <|endoftext|>."""
    return [i for doc in docs for i in [*one_shot(doc), GPT2.eot_token]]


def read_split(out, name: str) -> list[int]:
    return np.fromfile(out / f"{name}.bin", dtype=np.uint16).tolist()


@pytest.fixture
def small_blocks(monkeypatch):
    """Read text files 7 bytes at a time, so blocks end inside characters."""
    monkeypatch.setattr(documents, "READ_BYTES", 7)


@pytest.mark.parametrize("chunk_chars, workers", [(corpus.CHUNK_CHARS, None), (1, 2), (500, 1), (500, 2)])
def test_verdict_splits_equal_one_shot_encoding_of_each_part(verdict_path, tmp_path, chunk_chars, workers):
    text = verdict_path.read_text(encoding="utf-8")
    meta = tokenize_corpus(verdict_path, tmp_path, 0.9, workers=workers, chunk_chars=chunk_chars)
    cut = int(0.9 * len(text))  # the book's split
    assert read_split(tmp_path, "train") == one_shot(text[:cut])
    assert read_split(tmp_path, "val") == one_shot(text[cut:])
    assert not (tmp_path / "test.bin").exists()
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["split"] == {"by": "characters", "train_ratio": 0.9, "test_ratio": 0.0, "val": "data.url"}
    assert meta["documents"] == 1 and meta["bytes"] == verdict_path.stat().st_size
    assert meta["splits"]["train"] == {"file": "train.bin", "characters": cut, "bytes": len(text[:cut].encode()),
                                       "documents": 1, "tokens": len(one_shot(text[:cut]))}
    assert meta["splits"]["val"]["characters"] == len(text) - cut


def test_ids_are_the_same_with_a_tiktoken_older_than_encode_to_numpy(verdict_path, tmp_path, monkeypatch):
    text = verdict_path.read_text(encoding="utf-8")
    monkeypatch.delattr(tiktoken.Encoding, "encode_to_numpy")
    tokenize_corpus(verdict_path, tmp_path, 0.9, chunk_chars=1000, workers=2)
    assert read_split(tmp_path, "train") == one_shot(text[:int(0.9 * len(text))])


def test_test_split_is_the_end_of_the_text(verdict_path, tmp_path):
    text = verdict_path.read_text(encoding="utf-8")
    meta = tokenize_corpus(verdict_path, tmp_path, 0.8, 0.1, chunk_chars=100)
    a, b = int(0.8 * len(text)), int(0.9 * len(text))
    assert read_split(tmp_path, "train") == one_shot(text[:a])
    assert read_split(tmp_path, "val") == one_shot(text[a:b])
    assert read_split(tmp_path, "test") == one_shot(text[b:])
    assert list(meta["splits"]) == ["train", "val", "test"]
    assert meta["splits"]["test"]["file"] == "test.bin"
    # without a test split, the test.bin of an earlier run goes away
    tokenize_corpus(verdict_path, tmp_path, 0.9)
    assert not (tmp_path / "test.bin").exists()


# Texts where a cut in the wrong place changes the ids: runs of mixed whitespace (GPT-2's
# pattern treats the space before a word, and trailing whitespace, specially), contractions,
# digits, Unicode letters and spaces, control characters Python calls space but the
# tokenizer does not, and the special token.
ADVERSARIAL = [
    "a \n\nb", "a  \n  b\t\tc\r\n\r\nd", "x\n \n y \n", "end with spaces   ", "   start with spaces",
    "don't you've we'll I'd 'll 's", "1234 5678  90\n12", "naïve café 東京 Ελλάδα", "a\u00a0b\u2003c\u3000d",
    "a\x1cb \x1c c\x1f\n", "tabs\t\t\tthen\n\n\n\nnewlines", f"one{EOT} two {EOT}\n{EOT}three",
    "emoji 🙂🙂 and 🙂\n", "!!! ??? ...  --- ;;;", "a\u2028b \u2029 c\u0085d",
]


def all_safe_cuts(text: str) -> list[str]:
    """`text` cut at every SAFE_CUT."""
    chunks, rest = cut_chunks(text, 1)
    return chunks + [rest]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_cutting_at_every_safe_cut_keeps_the_ids(text):
    chunks = all_safe_cuts(text)
    assert "".join(chunks) == text
    assert [i for chunk in chunks for i in one_shot(chunk)] == one_shot(text)


def test_safe_cuts_keep_the_ids_of_random_text():
    rng = random.Random(0)
    alphabet = list("ab Z9'’.,!-\n\t\r ") + ["  ", "\n\n", " \n", "é", "東", "\u00a0", "\u2003", "\x1c", "'s", "'ll", EOT]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        chunks = all_safe_cuts(text)
        assert [i for chunk in chunks for i in one_shot(chunk)] == one_shot(text), repr(text)


def test_the_check_catches_an_unsafe_cut():
    """Cutting after any newline, the obvious rule, changes ids: the checks above would see it."""
    text = "a \n\nb"
    assert one_shot(text[:4]) + one_shot(text[4:]) != one_shot(text)
    assert not any(m.start() == 4 for m in SAFE_CUT.finditer(text))


def test_verdict_cut_everywhere_safe_keeps_the_ids(verdict_path):
    text = verdict_path.read_text(encoding="utf-8")
    chunks = all_safe_cuts(text)
    assert len(chunks) > 3000
    assert [i for chunk in chunks for i in one_shot(chunk)] == one_shot(text)


def test_one_document_read_in_tiny_blocks_splits_by_characters(tmp_path, small_blocks):
    text = f"Première « phrase » — 東京.\nsecond\n\ndocument  {EOT} 🙂 fourth one last" * 3
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    tokenize_corpus(path, tmp_path / "t", 0.5, 0.2, chunk_chars=3, workers=1)
    a, b = int(0.5 * len(text)), int(0.8 * len(text))
    for name, part in (("train", text[:a]), ("val", text[a:b]), ("test", text[b:])):
        assert read_split(tmp_path / "t", name) == one_shot(part), name


def documents_corpus(tmp_path, n_docs: int, seed: int = 1) -> tuple:
    """`n_docs` random documents as rows of a JSON-lines file."""
    rng = random.Random(seed)
    words = f"the a painter said Gisburn I had always thought Jack cheap genius, wife. \n {EOT}".split(" ")
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(n_docs)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path, docs


def expected_by_document(docs: list[str], train_ratio: float, test_ratio: float) -> list[list[str]]:
    """Each document to the split where it starts, from the definition."""
    n = sum(len(doc) for doc in docs)
    cuts = [int(train_ratio * n), int((1 - test_ratio) * n), n + 1]
    splits: list[list[str]] = [[], [], []]
    start = 0
    for doc in docs:
        splits[next(k for k, cut in enumerate(cuts) if start < cut)].append(doc)
        start += len(doc)
    return splits


@pytest.mark.parametrize("test_ratio", [0.0, 0.1])
def test_several_documents_split_by_document(tmp_path, test_ratio):
    path, docs = documents_corpus(tmp_path, 60)
    out = tmp_path / "tokens"
    meta = tokenize_corpus(path, out, 0.8, test_ratio, workers=2, chunk_chars=50)
    expected = expected_by_document(docs, 0.8, test_ratio)
    names = ["train", "val", "test"] if test_ratio else ["train", "val"]
    assert meta["split"]["by"] == "documents" and meta["documents"] == 60
    for name, split_docs in zip(names, expected):
        assert read_split(out, name) == by_document(split_docs), name
        assert meta["splits"][name]["documents"] == len(split_docs) > 0
        assert meta["splits"][name]["bytes"] == sum(len(doc.encode()) + len(EOT) for doc in split_docs)
    assert sum(len(d) for d in expected) == 60


def test_split_bytes_equal_the_bytes_of_its_tokens(tmp_path):
    path, _ = documents_corpus(tmp_path, 30)
    meta = tokenize_corpus(path, tmp_path / "t", 0.7, 0.15)
    for name, info in meta["splits"].items():
        ids = np.fromfile(tmp_path / "t" / info["file"], dtype=np.uint16)
        assert int(token_byte_lengths()[ids].sum()) == info["bytes"]


def test_a_split_without_a_document_names_the_ratios(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "first half of the text"}\n{"text": "second half of the text"}\n', encoding="utf-8")
    with pytest.raises(PipelineError, match="val split gets no document.*data.train_ratio or data.test_ratio"):
        tokenize_corpus(path, tmp_path / "out", 0.9)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 latin-1", "not UTF-8.*iconv"),
    (b" \n\t ", "holds no text"),
    (b"", "holds no text"),
])
def test_unreadable_corpus(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=message):
        tokenize_corpus(path, tmp_path / "out", 0.9)


def test_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """Python's peak allocation while tokenizing is about the same for a 1 MB and a 6 MB corpus,
    and a small fraction of it: neither the whole text nor all ids are held. (It grows by 8
    bytes per document, hence documents of about 50 kB here.)"""
    path, docs = documents_corpus(tmp_path, 20)
    unit = json.dumps({"text": " ".join(docs * 10)}) + "\n"
    token_byte_lengths(), corpus.gpt2_encoding()  # loaded once per process, not per corpus
    peaks = {}
    for megabytes in (1, 6):
        path.write_text(unit * (megabytes * 1_000_000 // len(unit)), encoding="utf-8")
        tracemalloc.start()
        try:
            tokenize_corpus(path, tmp_path / "t", 0.9, chunk_chars=1 << 13, workers=2)
            peaks[megabytes] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # the peak varies by a few chunks with thread timing; holding the text would add megabytes
    assert peaks[6] < 1.5 * peaks[1], peaks
    assert peaks[6] < path.stat().st_size / 6, peaks


@pytest.mark.parametrize("data, message", [
    ({"test_ratio": -0.1}, "data.test_ratio must be at least 0"),
    ({"test_ratio": 1.0}, "data.test_ratio must be at least 0 .* and below 1"),
    ({"train_ratio": 0.9, "test_ratio": 0.1}, r"data.train_ratio \+ data.test_ratio \(0.9 \+ 0.1\) must be below 1"),
    ({"test_ratio": "a lot"}, "data.test_ratio must be float"),
])
def test_test_ratio_validation(tmp_path, data, message):
    path = write_params(tmp_path / "params.yaml", {"data": data})
    with pytest.raises(PipelineError, match=message):
        load_params(path)


def test_default_test_ratio_is_zero():
    assert load_params(ROOT / "params.yaml").data.test_ratio == 0.0


def test_stage_writes_the_test_split_from_params(tmp_path, verdict_path):
    from test_stages import load_stage
    params = write_params(tmp_path / "params.yaml", {"data": {"train_ratio": 0.8, "test_ratio": 0.05}})
    load_stage("tokenize").main(["--params", str(params), "--corpus", str(verdict_path),
                                 "--out", str(tmp_path / "tokens"), "--workers", "2"])
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    text = verdict_path.read_text(encoding="utf-8")
    assert read_split(tmp_path / "tokens", "test") == one_shot(text[int(0.95 * len(text)):])
    assert meta["split"]["test_ratio"] == 0.05
