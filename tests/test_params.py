import pytest
import yaml

from conftest import ROOT, write_params
from gptpipe.errors import PipelineError
from gptpipe.model import GPTConfig
from gptpipe.params import load_params, resolve_architecture


def test_defaults_are_the_books_run():
    p = load_params(ROOT / "params.yaml")
    assert resolve_architecture(p.model) == GPTConfig(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12,
                                       n_layers=12, drop_rate=0.1, qkv_bias=False, tie_embeddings=False)
    assert p.model.init_from == "scratch"
    t = p.train
    assert (t.batch_size, t.stride, t.lr, t.weight_decay, t.epochs) == (2, 256, 4e-4, 0.1, 10)
    assert (t.eval_freq, t.eval_iter, t.seed, t.device) == (5, 5, 123, "auto")
    assert t.start_context == p.sample.prompt == "Every effort moves you"
    assert p.data.train_ratio == 0.9


def test_float_written_by_dvc_exp_run_as_text_is_a_float(tmp_path):
    # `dvc exp run -S train.lr=1e-05` writes `lr: 1e-05`, which YAML 1.1 reads as a string
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("lr: 0.0004", "lr: 1e-05"))
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-05"
    assert load_params(path).train.lr == 1e-05


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"n_heads": 5}}, "model.n_heads (5) must divide model.emb_dim (768)"),
    ({"train": {"lr": -0.1}}, "train.lr must be positive"),
    ({"train": {"lr": "fast"}}, "train.lr must be float"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size must be int"),
    ({"train": {"device": "tpu"}}, "train.device must be auto, cpu, cuda, cuda:N or mps"),
    ({"model": {"qkv_bias": "no"}}, "model.qkv_bias must be bool"),
    ({"data": {"train_ratio": 1.5}}, "data.train_ratio must be between 0 and 1"),
    ({"sample": {"temperature": -1}}, "sample.temperature must be >= 0"),
    ({"train": {"learning_rate": 0.1}}, "unknown key train.learning_rate"),
])
def test_bad_values_name_the_key(tmp_path, overrides, message):
    path = write_params(tmp_path / "params.yaml", overrides)
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(path)


def test_unknown_group_and_missing_key(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["optimizer"] = {"lr": 1}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match="unknown key optimizer"):
        load_params(tmp_path / "a.yaml")
    del params["optimizer"], params["train"]["seed"]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match="missing key train.seed"):
        load_params(tmp_path / "b.yaml")
