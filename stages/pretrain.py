"""Stage pretrain: train the GPT on the train split; write the model, its loss curves and metrics.

The model is a Hugging Face GPT-2 directory (config.json + model.safetensors): weights and model
config only, loadable by this pipeline and by transformers. A resumable state (optimizer, RNG) is
saved every train.checkpoint_every steps and on Ctrl-C/SIGTERM under --resume-dir, which is
not a DVC output; re-running with the same params and tokens resumes from it. With
train.nproc > 1 the stage relaunches itself under torchrun, one process per GPU (DDP).
"""

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import _library  # noqa: F401  (this checkout's library first)
from gptpipe import cli
from gptpipe.device import resolve_device
from gptpipe.distributed import require_devices, run_torchrun, under_torchrun
from gptpipe.params import load_params
from gptpipe.pretrain import PretrainPaths, run_pretraining


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--tokens", type=Path, default="data/tokens", help="directory written by the tokenize stage")
    parser.add_argument("--model", type=Path, default="data/model",
                        help="model directory (config.json + model.safetensors) to write")
    parser.add_argument("--plots", type=Path, default="plots", help="directory for losses.csv and lr.csv")
    parser.add_argument("--metrics", type=Path, default="metrics/train.json", help="training metrics (JSON) to write")
    parser.add_argument("--resume-dir", type=Path, default="data/resume", help="where the resumable state lives")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    if params.train.nproc > 1 and not under_torchrun():
        require_devices(params.train.nproc, resolve_device(params.train.device), torch.cuda.device_count())
        status = run_torchrun(params.train.nproc, Path(__file__).resolve(), sys.argv[1:] if argv is None else argv)
        if status != 0:
            sys.exit(status)
        return
    run_pretraining(params, PretrainPaths(args.tokens, args.model, args.plots, args.metrics, args.resume_dir))


if __name__ == "__main__":
    cli.run(main)
