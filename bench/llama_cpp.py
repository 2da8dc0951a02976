"""llama.cpp, the CPU inference engine users compare with, for bench_generate.py's side-by-side
rows: built here, outside the repository, from the llama.cpp vendored in llama-cpp-python's source
distribution on PyPI; our model directory (a Hugging Face GPT-2 directory, with GPT-2's tokenizer
files added) converted by llama.cpp's own convert_hf_to_gguf.py (f32), then
quantized by its llama-quantize (Q8_0); decoding timed by its llama-bench. Nothing of llama.cpp is
committed. Building needs cmake and a C++ compiler, and pip's access to PyPI once.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

# The sdist whose vendored llama.cpp is built (bench/README.md names it with the numbers).
LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-bench", "llama-quantize")


class Unavailable(Exception):
    """llama.cpp cannot be built or run here; the message says why."""


@dataclass
class LlamaCpp:
    source: Path  # the llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)
    bin: Path  # llama-bench, llama-quantize

    def tool(self, name: str) -> str:
        return str(self.bin / name)


def run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"{what} failed (exit status {result.returncode}): {last[0]}")
    return result


def build(workdir: Path) -> LlamaCpp:
    """llama.cpp's llama-bench and llama-quantize in `workdir`, built there on first use (a few
    minutes on 2 cores): pip download of the sdist, then cmake."""
    workdir = workdir.expanduser().resolve()
    source = workdir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    llama = LlamaCpp(source, workdir / "build" / "bin")
    if all((llama.bin / name).is_file() for name in TARGETS) and (source / "convert_hf_to_gguf.py").is_file():
        return llama
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{' and '.join(missing)} not found, needed to build llama.cpp")
    workdir.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        print(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist into {workdir}", flush=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(workdir)], "pip download of llama-cpp-python")
        with tarfile.open(workdir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as sdist:
            sdist.extractall(workdir, filter="data")
    print(f"building llama.cpp in {workdir / 'build'} (minutes)", flush=True)
    run(["cmake", "-S", str(source), "-B", str(workdir / "build"), "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        "cmake configure of llama.cpp")
    run(["cmake", "--build", str(workdir / "build"), "--config", "Release", "-j", str(os.cpu_count() or 1),
         "--target", *TARGETS], "cmake build of llama.cpp")
    return llama


def convert(llama: LlamaCpp, hf_dir: Path, out_dir: Path) -> dict[str, Path]:
    """GGUF files of a Hugging Face GPT-2 directory with its tokenizer: f32 by llama.cpp's
    convert_hf_to_gguf.py, Q8_0 by llama-quantize."""
    files = {"f32": out_dir / "model-f32.gguf", "Q8_0": out_dir / "model-q8_0.gguf"}
    env = {**os.environ, "PYTHONPATH": str(llama.source / "gguf-py")}
    run([sys.executable, str(llama.source / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
         "--outfile", str(files["f32"])], "llama.cpp's convert_hf_to_gguf.py", env=env)
    run([llama.tool("llama-quantize"), str(files["f32"]), str(files["Q8_0"]), "Q8_0"], "llama-quantize")
    return files


def decode_tokens_per_second(llama: LlamaCpp, gguf: Path, new_tokens: int, threads: int) -> float:
    """llama-bench's tg test: `new_tokens` single-token decodes from an empty context, once after
    its warm-up run."""
    result = run([llama.tool("llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-t", str(threads),
                  "-r", "1", "-o", "json"], "llama-bench")
    return float(json.loads(result.stdout)[0]["avg_ts"])
