"""Build the tiny bundled demo model in pipeline/demo/model/.

The pipeline's main job needs a real causal LM and tokenizer to prune, but the
tests and demo must run offline, so we train a ~1M-parameter Llama (with GQA,
like current Llamas) from scratch on a slice of the Vim reference manual.
Same seed, torch version and thread count give the same weights.

    .venv/bin/python tools/make_demo_model.py
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 1024
SEQ_LEN = 128
BATCH = 16
BOS, EOS, PAD = "<s>", "</s>", "<pad>"  # trained first, so ids 0, 1, 2
# Every Vim help file starts with a "*name.txt*" tag line; split the corpus
# there so each help file is its own <s> ... </s> document.
HELP_FILE_START = re.compile(r"(?m)^(?=\*[\w.-]+\.txt\*)")


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE: no unknown tokens, whatever bytes the pipeline feeds it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    # Like Llama: prepend <s>, no </s>, so tokenizer(text) matches training.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """One packed token stream: <s> help-file </s> <s> help-file </s> ..."""
    ids: list[int] = []
    for doc in HELP_FILE_START.split(text):
        if doc:
            ids += tokenizer(doc, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    """Perplexity over non-overlapping SEQ_LEN windows (tail dropped)."""
    model.eval()
    windows = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    # Every window has the same number of targets, so a window-weighted mean
    # of batch losses is the per-token mean.
    total = sum(model(input_ids=w, labels=w).loss.item() * len(w) for w in windows.split(BATCH))
    model.train()
    return math.exp(total / len(windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--text",
        type=Path,
        default=ROOT / "pipeline/demo/text",
        help="dir holding train.txt and valid.txt",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "pipeline/demo/model")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # Two threads and deterministic kernels: reproducible on the 2-core CI box.
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)

    train_text = (args.text / "train.txt").read_text(encoding="utf-8")
    valid_text = (args.text / "valid.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer(train_text)
    train_ids, valid_ids = encode(tokenizer, train_text), encode(tokenizer, valid_text)
    print(f"tokens: train {len(train_ids)}, valid {len(valid_ids)}")

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per KV head
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,  # separate lm_head, as in larger Llamas
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_scale(step: int) -> float:
        # Linear warmup, then cosine decay to 10% of the peak rate.
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    # Own generator for window offsets, so batches depend only on the seed.
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(SEQ_LEN)

    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        # Random packed windows rather than epochs: the corpus is tiny.
        starts = torch.randint(0, len(train_ids) - SEQ_LEN, (BATCH, 1), generator=gen)
        batch = train_ids[starts + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.3f}  {elapsed:.0f}s")
    print(f"train time: {time.perf_counter() - start:.0f}s")
    print(f"valid perplexity: {perplexity(model, valid_ids):.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    # safe_serialization is the default (and only) format in transformers 5;
    # passing it keeps 4.x from writing a pickle checkpoint.
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
