"""Model files (weights + config, safetensors) and the one safe torch.load."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptpipe.checkpoint import HEADER_KEY, load_model, read_model_file, save_model, torch_load
from gptpipe.errors import PipelineError
from gptpipe.model import GPTConfig, GPTModel

CFG = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1)


def trained_model() -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    return model


def test_round_trip_holds_weights_config_and_progress_only(tmp_path):
    model = trained_model()
    path = tmp_path / "model.safetensors"
    save_model(path, model, step=1, epoch=1, tokens_seen=16)
    with safe_open(path, framework="pt") as f:  # plain tensors and a JSON header, nothing else
        assert set(f.keys()) == set(model.state_dict())
        header = json.loads(f.metadata()[HEADER_KEY])
    assert header["config"]["emb_dim"] == 16 and header["progress"] == {"step": 1, "epoch": 1, "tokens_seen": 16}
    assert path.stat().st_size < 1.01 * sum(p.numel() * 4 for p in model.parameters()) + 4096
    loaded, progress = load_model(path, torch.device("cpu"))
    assert loaded.cfg == CFG and not loaded.training and progress["step"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_same_model_gives_the_same_bytes(tmp_path):
    """DVC hashes the file: its header must not come out in a different order each time."""
    model = trained_model()
    for i in range(8):
        save_model(tmp_path / f"{i}.safetensors", model, step=1, epoch=1)
    assert len({(tmp_path / f"{i}.safetensors").read_bytes() for i in range(8)}) == 1


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(PipelineError, match="not found: run the pretrain stage"):
        load_model(tmp_path / "nope.safetensors", torch.device("cpu"))
    save_model(tmp_path / "good.safetensors", trained_model(), step=1)
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="not a readable safetensors file"):
        read_model_file(tmp_path / "cut.safetensors")
    save_file({"weights": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(PipelineError, match="not a model of this pipeline"):
        read_model_file(tmp_path / "other.safetensors")


def test_a_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match="refused for safety") as e:
        torch_load(tmp_path / "evil.pt", "the file", "delete it")
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the unsafe way runs the payload
    assert marker.exists()


def test_weights_that_do_not_fit_the_stored_config(tmp_path):
    model = trained_model()
    header = {"format_version": 1, "config": {**vars(CFG), "emb_dim": 32}, "progress": {}}  # n_heads 2 divides 32
    save_file(model.state_dict(), tmp_path / "mixed.safetensors", metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(PipelineError, match="do not fit the model config"):
        load_model(tmp_path / "mixed.safetensors", torch.device("cpu"))


def test_tied_embeddings_are_stored_once_and_stay_one_parameter(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**vars(CFG), "tie_embeddings": True}))
    save_model(tmp_path / "tied.safetensors", model, step=0)
    with safe_open(tmp_path / "tied.safetensors", framework="pt") as f:
        assert "out_head.weight" not in f.keys()
    loaded, _ = load_model(tmp_path / "tied.safetensors", torch.device("cpu"))
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.out_head.weight, model.out_head.weight)


def test_weights_whose_sum_overflows_are_still_finite(tmp_path):
    """The finiteness check sums each tensor first; a sum that overflows is not a NaN weight."""
    model = trained_model()
    with torch.no_grad():
        model.final_norm.weight.fill_(3e38)  # finite, but 16 of them sum to inf in float32
    save_model(tmp_path / "huge.safetensors", model, step=1)
    loaded, _ = load_model(tmp_path / "huge.safetensors", torch.device("cpu"))
    assert torch.equal(loaded.final_norm.weight, model.final_norm.weight)
    with torch.no_grad():
        model.final_norm.weight[3] = float("nan")
    save_model(tmp_path / "nan.safetensors", model, step=1)
    with pytest.raises(PipelineError, match="final_norm.weight holds NaN or infinite values"):
        load_model(tmp_path / "nan.safetensors", torch.device("cpu"))
