"""The book's chapter 5 code (llms-from-scratch) as a user runs it, one process per command,
for bench/bench_stages.py to time next to the pipeline's stages.

    python bench/book_process.py pretrain CORPUS OUT_DIR --epochs 1   # train_model_simple, save model.pth
    python bench/book_process.py sample OUT_DIR --new-tokens 200     # load model.pth, generate greedily

pretrain is the book's training section: the book's config and loaders (90/10 split by
characters, batch 2, context 256), AdamW (lr 4e-4, weight decay 0.1), train_model_simple with
eval_freq 5, eval_iter 5 and its sample after each epoch, then torch.save(model.state_dict()).
It prints the training loop's seconds last, as JSON. sample loads the saved model into a fresh
GPTModel and generates with the book's generate (temperature 0: greedy).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import tiktoken
import torch
from llms_from_scratch.ch02 import create_dataloader_v1
from llms_from_scratch.ch04 import GPTModel
from llms_from_scratch.ch05 import generate, text_to_token_ids, token_ids_to_text, train_model_simple

sys.path.insert(0, str(Path(__file__).parent))
from common import BOOK_CONFIG  # noqa: E402

from gptpipe.tokenizer import seed_tiktoken_cache  # noqa: E402  (the BPE files, offline)


def pretrain(corpus: Path, out_dir: Path, epochs: int) -> None:
    text = corpus.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=256, stride=256,
                                        drop_last=True, shuffle=True)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=256, stride=256,
                                      drop_last=False, shuffle=False)
    torch.manual_seed(123)
    model = GPTModel(BOOK_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    start = time.perf_counter()
    train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=epochs, eval_freq=5,
                       eval_iter=5, start_context="Every effort moves you", tokenizer=tiktoken.get_encoding("gpt2"))
    loop_seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pth")
    print(json.dumps({"loop_seconds": loop_seconds}))


def sample(out_dir: Path, new_tokens: int) -> None:
    tokenizer = tiktoken.get_encoding("gpt2")
    model = GPTModel(BOOK_CONFIG)
    model.load_state_dict(torch.load(out_dir / "model.pth", weights_only=True))
    model.eval()
    ids = generate(model, text_to_token_ids("Every effort moves you", tokenizer), max_new_tokens=new_tokens,
                   context_size=BOOK_CONFIG["context_length"])
    print(token_ids_to_text(ids, tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain")
    p.add_argument("corpus", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--epochs", type=int, default=1)
    s = commands.add_parser("sample")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--new-tokens", type=int, default=200)
    args = parser.parse_args()
    seed_tiktoken_cache()
    if args.command == "pretrain":
        pretrain(args.corpus, args.out_dir, args.epochs)
    else:
        sample(args.out_dir, args.new_tokens)


if __name__ == "__main__":
    main()
