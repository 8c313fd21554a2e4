"""Regenerate the shipped transformers sample ``gpt2_shakespeare/``, deterministically.

Run from the repository root (needs transformers and tokenizers: ``pip install '.[hf]'``; no
network; about a minute on one CPU core)::

    .venv/bin/python sample_checkpoints/make_gpt2_sample.py

Writes into sample_checkpoints/:

* ``gpt2_shakespeare/``: a ``GPT2LMHeadModel`` (2 layers, d 64, 4 heads, 128 positions, tied head)
  saved with ``save_pretrained`` (``config.json``, ``generation_config.json``,
  ``model.safetensors``) beside a byte-level tokenizer saved with ``save_pretrained``
  (``tokenizer.json``, ``tokenizer_config.json``): a BPE with no merges over the 256 byte
  symbols, so token id = byte value and the vocabulary is 256. Trained with AdamW on windows of
  65 bytes (64 predictions each) of the first
  90% of the bytes of ``shakespeare_excerpt.txt``, stopped early (``STEPS``), so that resumed
  training still has work to do;
* ``gpt2_shakespeare_calibration.safetensors``: ``tokens`` (128 x 65) windows of the training part;
* ``gpt2_shakespeare_holdout.safetensors``: ``tokens`` (256 x 65) windows of the last 10%.

The tokenizer is built offline from the byte table (``tokenizers``' ``ByteLevel`` alphabet) and
reloads with ``AutoTokenizer.from_pretrained(folder)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "gpt2_shakespeare"
SEED = 0
CONTEXT = 64
CAL, HOLD = 128, 256
STEPS, BATCH, LR = 300, 32, 3e-3
CONFIG = {"vocab_size": 256, "n_positions": 2 * CONTEXT, "n_embd": 64, "n_layer": 2, "n_head": 4,
          "bos_token_id": None, "eos_token_id": None}


def byte_tokenizer():
    """A byte-level PreTrainedTokenizerFast whose token ids are the UTF-8 bytes (0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte table
    table = _bytes_to_unicode()
    assert sorted(table.values()) == sorted(alphabet)
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=CONFIG["n_positions"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (as in its original encoder)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def main() -> None:
    import transformers

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    data = (HERE / "shakespeare_excerpt.txt").read_bytes()
    tok = byte_tokenizer()
    ids = torch.tensor(tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"], dtype=torch.int64)
    assert ids.tolist() == list(data), "token ids must be the bytes"
    cut = int(0.9 * len(ids))
    train, held = ids[:cut], ids[cut:]
    g = torch.Generator().manual_seed(SEED)

    def windows(part: torch.Tensor, n: int) -> torch.Tensor:
        starts = torch.randint(0, len(part) - CONTEXT - 1, (n,), generator=g)
        return torch.stack([part[s : s + CONTEXT + 1] for s in starts.tolist()])

    cal, hold = windows(train, CAL).contiguous(), windows(held, HOLD).contiguous()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    start = time.time()
    model.train()
    for step in range(1, STEPS + 1):
        b = windows(train, BATCH)
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                hl = float(model(input_ids=hold, labels=hold).loss)
            model.train()
            print(f"step {step}: train loss {float(loss):.3f}, held-out loss {hl:.3f}, {time.time() - start:.0f} s", flush=True)
    model.eval()
    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT)
    tok.save_pretrained(OUT)
    for f in OUT.iterdir():
        f.chmod(0o644)
    save_file({"tokens": cal}, str(HERE / "gpt2_shakespeare_calibration.safetensors"))
    save_file({"tokens": hold}, str(HERE / "gpt2_shakespeare_holdout.safetensors"))


if __name__ == "__main__":
    main()
