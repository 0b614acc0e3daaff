"""Train a tiny Llama on the bundled corpus on the CPU and save checkpoints along the way: a series to sweep.

Each checkpoint is a Hugging Face folder qkspectra reads (``config.json``, ``model.safetensors`` and the
tokenizer: the bundled all-MiniLM-L6-v2's WordPiece vocabulary), ``OUT/step-NNNNN/``; ``OUT/models.csv``
lists them with their labels (``step``, ``tokens``, ``loss``: the mean training loss of the last 20
steps) for ``qkspectra sweep --models OUT/models.csv``.

The model: 4 layers, 4 query heads sharing 2 key/value heads (grouped-query attention), d_model 128,
d_head 32, rotary positions, tied embeddings. Next-token cross-entropy on 64-token windows of the
bundled corpus (the first 90%), AdamW (lr 3e-3, 30 warm-up steps, cosine decay), seeded. Training
uses only the rows of the vocabulary the corpus contains (the 30522-way softmax would cost most of
each step); each checkpoint scatters them into the full vocabulary, whose other rows keep their
random initialisation.

Usage: python scripts/train_checkpoints.py [--out checkpoints] [--steps 300] [--save 0,10,25,50,100,200,300]
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save", default="0,10,25,50,100,200,300", help="steps after which to save (0: the initialisation)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import importlib.resources

    from qkspectra.models.bundled import bundled_model_path

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("minilm"))
    text = (importlib.resources.files("qkspectra") / "data" / "default_corpus.txt").read_text(encoding="utf-8")
    tokenizer.model_max_length = 10**9  # the corpus is tokenized whole, then cut into windows
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # (N,)
    used = torch.unique(ids)  # (V',) the vocabulary rows the corpus needs
    compact = torch.full((tokenizer.vocab_size,), -1, dtype=torch.long)
    compact[used] = torch.arange(used.numel())
    train = compact[ids[: int(0.9 * ids.numel())]]  # (N_train,) in the compact vocabulary
    full_config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    full = LlamaForCausalLM(full_config)  # what is saved
    model = LlamaForCausalLM(LlamaConfig(**{**full_config.to_dict(), "vocab_size": used.numel()}))  # what is trained
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = 30
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    save_at = sorted({int(s) for s in args.save.split(",") if int(s) <= args.steps})
    args.out.mkdir(parents=True, exist_ok=True)
    rows, losses = [], []
    clock = time.perf_counter()

    def save(step: int) -> None:
        folder = args.out / f"step-{step:05d}"
        with torch.no_grad():
            weights = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
            full.load_state_dict(weights, strict=False)
            full.model.embed_tokens.weight[used] = model.model.embed_tokens.weight
        full.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        loss = sum(losses[-20:]) / len(losses[-20:]) if losses else None
        rows.append({"model": folder.name, "step": step, "tokens": step * args.batch_size * args.seq_len,
                     "loss": "" if loss is None else f"{loss:.4f}"})
        with open(args.out / "models.csv", "w", newline="") as f:  # after every checkpoint: an interrupted run leaves a usable list
            writer = csv.DictWriter(f, fieldnames=["model", "step", "tokens", "loss"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"step {step:5d}  loss {rows[-1]['loss'] or '-':>7}  {time.perf_counter() - clock:6.1f} s  -> {folder}", flush=True)

    model.train()
    if 0 in save_at:
        save(0)
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch_size,))
        batch = torch.stack([train[s : s + args.seq_len] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step in save_at:
            save(step)
    print(f"wrote {len(rows)} checkpoints and {args.out / 'models.csv'}")


if __name__ == "__main__":
    main()
