import numpy as np
import pytest
import torch

from gptpipe.data import TokenWindows, require_windows, split_text, window_loader
from gptpipe.tokens import read_tokens, write_tokens
from gptpipe.errors import PipelineError


@pytest.mark.parametrize("n, context, stride", [(100, 8, 8), (100, 8, 1), (100, 8, 3), (9, 8, 8),
                                                (50, 16, 20)])
def test_windows_count_and_content(n, context, stride):
    tokens = np.arange(n, dtype=np.uint16)
    windows = TokenWindows(tokens, context, stride)
    starts = list(range(0, n - context, stride))  # every window needs context + 1 tokens
    assert len(windows) == len(starts)
    for i, start in enumerate(starts):
        x, y = windows[i]
        assert x.tolist() == list(range(start, start + context))
        assert y.tolist() == list(range(start + 1, start + context + 1))


def test_windows_are_views_not_copies(tmp_path):
    write_tokens(tmp_path / "t.bin", list(range(1000)))
    tokens = read_tokens(tmp_path / "t.bin")
    x, y = TokenWindows(tokens, 16, 4)[3]
    assert np.shares_memory(x, tokens) and np.shares_memory(y, tokens)


def test_token_file_round_trip(tmp_path):
    ids = [0, 1, 50256, 15496]
    assert write_tokens(tmp_path / "t.bin", ids) == 4
    assert read_tokens(tmp_path / "t.bin").tolist() == ids
    assert (tmp_path / "t.bin").stat().st_size == 8  # uint16


def test_loader_batches_shuffle_with_global_seed_and_drop_last():
    tokens = np.arange(1001, dtype=np.uint16)
    def first_inputs():
        torch.manual_seed(7)
        loader = window_loader(tokens, 10, 10, batch_size=3, shuffle=True, drop_last=True)
        return [x[:, 0].tolist() for x, _ in loader], len(loader)
    (order1, n1), (order2, _) = first_inputs(), first_inputs()
    assert order1 == order2 and n1 == 100 // 3
    assert all(len(b) == 3 for b in order1)
    val = window_loader(tokens, 10, 10, batch_size=3, shuffle=False, drop_last=False)
    batches = list(val)
    assert len(batches) == 34 and batches[-1][0].shape == (1, 10)
    assert batches[0][0].dtype == torch.int64


def test_split_by_characters():
    assert split_text("abcdefghij", 0.9) == ("abcdefghi", "j")


def test_too_few_tokens_names_the_params():
    with pytest.raises(PipelineError, match="model.context_length=256.*data.train_ratio"):
        require_windows(200, 256, "val")
    require_windows(257, 256, "val")


def test_releasing_mapped_pages_keeps_every_window_right(tmp_path, monkeypatch):
    ids = np.random.default_rng(1).integers(0, 50257, 5000)
    write_tokens(tmp_path / "t.bin", ids)
    tokens = read_tokens(tmp_path / "t.bin")
    windows = TokenWindows(tokens, 16, 3)
    monkeypatch.setattr(windows, "release_every", 7)  # release often, between reads
    for i in range(len(windows)):
        x, y = windows[i]
        start = 3 * i
        assert x.tolist() == ids[start:start + 16].tolist() and y.tolist() == ids[start + 1:start + 17].tolist()
    assert windows.reads == len(windows) and len(windows) > 7 * 100
