"""Train the small GPT-2 shipped with symconvert (``symconvert/assets/gpt2-wikitext2``), the
real pretrained causal LM of the ``hf:`` tests and README figures.

Data: WikiText-2 (``/work/shared/data/wikitext-2`` or ``--data``), which ships here without
its train split: ``valid.txt`` is the training text, ``test.txt`` the evaluation text (as
``text:ROOT`` reads them for an ``hf:`` model). A byte-level BPE tokenizer (``tokenizers``)
is trained on valid.txt; the model is transformers' ``GPT2LMHeadModel`` (tied embeddings),
trained with AdamW + cosine decay on fixed-length sequences. CPU, seeded.

Writes a Hugging Face directory: ``config.json``, ``model.safetensors`` (fp16 unless
``--fp32``), ``tokenizer.json`` and ``training.json`` (settings, test perplexity, command).

    python scripts/train_hf_gpt2.py --minutes 4
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ASSET = Path(__file__).resolve().parents[1] / "symconvert" / "assets" / "gpt2-wikitext2"
SEQ = 128


def train_tokenizer(text: Path, vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text)], trainer)
    return tok


def encode(tok: Tokenizer, path: Path) -> torch.Tensor:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    ids = [i for enc in tok.encode_batch(lines, add_special_tokens=False) for i in enc.ids]
    n = len(ids) // SEQ
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in data.split(64):
        logits = model(input_ids=batch).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/wikitext-2"))
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fp32", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = train_tokenizer(args.data / "valid.txt", args.vocab)
    train, test = encode(tok, args.data / "valid.txt"), encode(tok, args.data / "test.txt")
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=SEQ, n_embd=args.width, n_layer=args.layers,
        n_head=4, bos_token_id=0, eos_token_id=0, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
    config.architectures = ["GPT2LMHeadModel"]
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start, step, budget = time.time(), 0, args.minutes * 60
    est_steps = None
    while time.time() - start < budget:
        order = torch.randperm(len(train))
        for i in range(0, len(train) - args.batch_size + 1, args.batch_size):
            elapsed = time.time() - start
            if elapsed >= budget:
                break
            if step == 20:  # steps the budget allows, for the cosine schedule
                est_steps = int(budget / (elapsed / 20))
            frac = min(step / est_steps, 1.0) if est_steps else 0.0
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac))
            batch = train[order[i:i + args.batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step} loss {loss.item():.3f} {elapsed:.0f}s", flush=True)
    ppl = perplexity(model, test)
    print(f"test perplexity {ppl:.2f} after {step} steps", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if args.fp32 else torch.float16
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(config.to_json_string())
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "training.json").write_text(json.dumps({
        "data": "WikiText-2 valid.txt (train) / test.txt (eval)", "steps": step,
        "sequence": SEQ, "batch_size": args.batch_size, "lr": args.lr, "minutes": args.minutes,
        "params": sum(p.numel() for p in model.parameters()), "test_perplexity": ppl,
        "test_tokens": int(test[:, 1:].numel()), "dtype": str(dtype).removeprefix("torch."),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
