"""Each stage reads exactly the params keys dvc.yaml declares for it, and answers --help."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, stage_args, write_params
from gptpipe import params as params_module

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def script_of(stage: str) -> Path:
    return ROOT / DVC_YAML[stage]["cmd"].split()[1]


def load_stage(stage: str):
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", script_of(stage))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recording(obj, group: str, seen: set[str]):
    """A copy of dataclass `obj` that records each field read as 'group.field'."""
    names = {f.name for f in dataclasses.fields(obj)}

    class Recording(type(obj)):
        def __getattribute__(self, name):
            if name in names:
                seen.add(f"{group}.{name}")
            return object.__getattribute__(self, name)

    copy = object.__new__(Recording)
    copy.__dict__.update(obj.__dict__)
    return copy


def run_recorded(stage: str, args: list[str], params_path: Path, monkeypatch) -> set[str]:
    seen: set[str] = set()

    def load_recorded(path):
        loaded = params_module.load_params(path)
        return params_module.Params(**{f.name: recording(getattr(loaded, f.name), f.name, seen)
                                       for f in dataclasses.fields(loaded)})

    module = load_stage(stage)
    monkeypatch.setattr(module, "load_params", load_recorded)
    module.main(["--params", str(params_path), *args])
    return seen


# The defaults, and the options that add a test split and bound the evaluation.
VARIANTS = {"defaults": {},
            "test-split-max-tokens": {"data": {"test_ratio": 0.05}, "evaluate": {"max_tokens": 64}}}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_stage_reads_exactly_its_declared_params(tmp_path, corpus_path, monkeypatch, variant):
    params_path = write_params(tmp_path / "params.yaml", {**TINY, **variant}, corpus_path)
    runs = {stage: stage_args(script_of(stage).stem, tmp_path) for stage in DVC_YAML}
    assert list(runs) == list(DVC_YAML), "the test must cover every stage of dvc.yaml"
    read_by_any = set()
    for stage, args in runs.items():
        read = run_recorded(stage, args, params_path, monkeypatch)
        assert read == set(DVC_YAML[stage].get("params", [])), stage
        read_by_any |= read
    all_keys = {f"{group}.{key}" for group, keys in yaml.safe_load(params_path.read_text()).items()
                for key in keys}
    assert all_keys == read_by_any, "params.yaml holds keys that no stage reads"


@pytest.mark.parametrize("stage", list(DVC_YAML))
def test_stage_declares_its_script_and_the_library(stage):
    deps = DVC_YAML[stage]["deps"]
    assert str(script_of(stage).relative_to(ROOT)) in deps
    assert "src/gptpipe" in deps


@pytest.mark.parametrize("stage", list(DVC_YAML))
def test_stage_help(stage):
    result = subprocess.run([sys.executable, str(script_of(stage)), "--help"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--params" in result.stdout and "usage:" in result.stdout
