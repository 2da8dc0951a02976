import math

import numpy as np
import pytest
import torch

from gptpipe.data import window_loader
from gptpipe.errors import PipelineError
from gptpipe.model import GPTConfig, GPTModel
from gptpipe.pretrain import make_optimizer
from gptpipe.train import Loaders, LoopSettings, LRSchedule, train, warmup_steps

CPU = torch.device("cpu")
CFG = GPTConfig(vocab_size=97, context_length=8, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
TOKENS = np.random.default_rng(0).integers(0, 97, 8 * 24 + 1).astype(np.uint16)  # 24 windows


def constant(lr=1e-3, total=100):
    return LRSchedule("constant", lr, 0.0, 0.0, 0, total)


def run(batch_size, accum=1, steps=None, amp_dtype=None, schedule=None, grad_clip=None, seed=0):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    optimizer = make_optimizer(model, 1e-3, 0.1, fused=False)
    loader = window_loader(TOKENS, 8, 8, batch_size, shuffle=False, drop_last=True)
    settings = LoopSettings(epochs=1, eval_freq=1, eval_iter=2, grad_accum_steps=accum,
                            grad_clip=grad_clip, max_steps=steps)
    state = train(model, optimizer, Loaders(loader, loader), settings, schedule or constant(), device=CPU,
                  amp_dtype=amp_dtype)
    return model, state


def test_cosine_schedule_warms_up_then_decays():
    s = LRSchedule("cosine", peak_lr=1e-3, initial_lr=1e-4, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(5) == pytest.approx(5.5e-4)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert s.lr_at(110) == pytest.approx(1e-5)
    assert warmup_steps(0.1, 90) == 9 and warmup_steps(20, 90) == 20


def test_logged_lr_follows_the_schedule():
    schedule = LRSchedule("cosine", 1e-3, 0.0, 1e-4, 2, 6)
    _, state = run(batch_size=4, schedule=schedule)
    assert [r.lr for r in state.records] == [schedule.lr_at(s) for s in range(6)]


def test_accumulating_micro_batches_equals_one_big_batch():
    big, big_state = run(batch_size=8)
    small, small_state = run(batch_size=2, accum=4)
    assert small_state.step == big_state.step == 3
    assert small_state.tokens_seen == big_state.tokens_seen
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [r.grad_norm for r in small_state.records] == pytest.approx(
        [r.grad_norm for r in big_state.records], rel=1e-5)


def test_clipping_bounds_the_update_and_logs_the_norm_before_it():
    _, unclipped = run(batch_size=4, steps=1)
    torch.manual_seed(0)
    before = GPTModel(CFG).state_dict()
    after, clipped = run(batch_size=4, steps=1, grad_clip=1e-3)
    assert clipped.records[0].grad_norm == pytest.approx(unclipped.records[0].grad_norm)
    assert clipped.records[0].grad_norm > 1e-3
    # AdamW's first step moves each weight by about lr whatever the gradient's scale, so
    # compare the loss after the step instead: clipping to a tiny norm changes it less
    assert clipped.records[0].train_loss != unclipped.records[0].train_loss
    assert any(not torch.equal(before[k], v) for k, v in after.state_dict().items())


def test_max_steps_stops_early():
    _, state = run(batch_size=2, steps=5)
    assert state.step == 5 and len(state.records) == 5


def test_bf16_autocast_loss_is_close_to_fp32():
    _, fp32 = run(batch_size=4)
    _, bf16 = run(batch_size=4, amp_dtype=torch.bfloat16)
    for a, b in zip(fp32.records, bf16.records):
        assert b.train_loss == pytest.approx(a.train_loss, rel=2e-2)
        assert b.val_loss == pytest.approx(a.val_loss, rel=2e-2)


def test_a_non_finite_loss_stops_with_the_step_named():
    torch.manual_seed(0)
    model = GPTModel(CFG)
    optimizer = make_optimizer(model, 1e-3, 0.1, fused=False)
    loader = window_loader(TOKENS, 8, 8, 4, shuffle=False, drop_last=True)
    with torch.no_grad():
        model.final_norm.weight[0] = math.nan
    with pytest.raises(PipelineError, match=r"became nan at step 0 \(epoch 1\).*train.lr"):
        train(model, optimizer, Loaders(loader, loader), LoopSettings(1, 1, 1), constant(), device=CPU)


def test_a_compiled_forward_trains_like_the_eager_one():
    """train.compile hands the loop torch.compile's wrapper (here with the eager backend: the
    wrapper, without minutes of code generation)."""
    _, eager = run(batch_size=4, steps=2)
    torch.manual_seed(0)
    model = GPTModel(CFG)
    optimizer = make_optimizer(model, 1e-3, 0.1, fused=False)
    loader = window_loader(TOKENS, 8, 8, 4, shuffle=False, drop_last=True)
    compiled = train(model, optimizer, Loaders(loader, loader), LoopSettings(1, 1, 2, max_steps=2), constant(),
                     device=CPU, forward=torch.compile(model, backend="eager"))
    assert [r.train_loss for r in compiled.records] == pytest.approx([r.train_loss for r in eager.records])
