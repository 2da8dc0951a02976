import math

import numpy as np
import pytest
import torch

from conftest import UniformModel
from gptpipe.data import window_loader
from gptpipe.metrics import batch_loss, evaluate_loader, perplexity
from gptpipe.model import GPTConfig, GPTModel


def test_uniform_model_loss_is_log_vocab():
    inputs = torch.randint(0, 50, (2, 5))
    assert batch_loss(UniformModel(50), inputs, inputs).item() == pytest.approx(math.log(50))
    assert perplexity(math.log(50)) == pytest.approx(50)


def test_evaluation_weights_every_token_equally():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1)).eval()
    tokens = np.random.default_rng(0).integers(0, 64, 90).astype(np.uint16)
    # batches of 3, 3 and 1 windows (ten windows start below 90 - 8 at stride 8... minus the last)
    loader = window_loader(tokens, 8, 8, batch_size=3, shuffle=False, drop_last=False)
    full = evaluate_loader(model, loader, torch.device("cpu"))
    one_batch = window_loader(tokens, 8, 8, batch_size=100, shuffle=False, drop_last=False)
    x, y = next(iter(one_batch))
    assert full.tokens == y.numel() == len(loader.dataset) * 8
    assert full.loss == pytest.approx(batch_loss(model, x, y).item())
    first = evaluate_loader(model, loader, torch.device("cpu"), max_batches=1)
    assert first.tokens == 3 * 8
    assert model.training is False
