import pytest
import torch

from gptpipe.checkpoint import load_checkpoint, load_model, save_checkpoint
from gptpipe.errors import PipelineError
from gptpipe.model import GPTConfig, GPTModel

CFG = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1)


def trained_pair():
    torch.manual_seed(0)
    model = GPTModel(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip(tmp_path):
    model, optimizer = trained_pair()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer, step=1, epoch=1, tokens_seen=16)
    state = torch.load(path, weights_only=True)  # plain tensors and values only
    assert state["step"] == 1 and state["tokens_seen"] == 16 and state["config"]["emb_dim"] == 16
    loaded, _ = load_model(path, torch.device("cpu"))
    assert loaded.cfg == CFG and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert [tmp.name for tmp in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(PipelineError, match="not found: run the pretrain stage"):
        load_checkpoint(tmp_path / "nope.pt")
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path / "good.pt", model, optimizer, step=1)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(PipelineError, match="not a checkpoint of this pipeline"):
        load_checkpoint(tmp_path / "other.pt")



def test_a_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload(), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match="refused for safety"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the unsafe way runs the payload
    assert marker.exists()


def test_weights_that_do_not_fit_the_stored_config(tmp_path):
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, step=1)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["config"]["emb_dim"] = 32  # n_heads 2 still divides it; the tensors are 16 wide
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(PipelineError, match="do not fit the model config"):
        load_model(tmp_path / "mixed.pt", torch.device("cpu"))


def test_tied_embeddings_stay_one_parameter_after_loading(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**vars(CFG), "tie_embeddings": True}))
    save_checkpoint(tmp_path / "tied.pt", model, None, step=0)
    loaded, _ = load_model(tmp_path / "tied.pt", torch.device("cpu"))
    assert loaded.out_head.weight is loaded.tok_emb.weight
