"""Training text: token sequences sampled from the LM itself from seed prompts (``data.source=lm``,
works offline on the bundled model) or cut from a text file (``data.source=file``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from spindiff.lm.tokens import pad_left

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris. The capital of Germany is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The mitochondria is the powerhouse of the cell. It",
    "To make a simple tomato sauce, first",
    "Dear hiring manager, I am writing to apply for",
    "The stock market fell sharply on Monday after",
    "Photosynthesis converts light energy into",
    "In 1969, Neil Armstrong became the first person to",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The rain had not stopped for three days, and",
    "Lions are carnivores. Cows are herbivores. Bears are",
    "Here is a list of the planets in our solar system:",
    "The theorem states that for every prime number p,",
    "My favourite thing about autumn is",
    "SELECT name, age FROM users WHERE",
    "The French Revolution began in 1789 when",
    "A good night's sleep is important because",
    "The recipe calls for two cups of flour, one egg and",
    "Machine learning models are trained by",
    "She opened the old wooden box and found",
    "The weather forecast for tomorrow predicts",
    "Water is made of hydrogen and oxygen. Salt is made of",
    "In the beginning of the twentieth century, the city of",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\n",
    "The best way to learn a new language is",
    "The football match ended in a draw after",
    "Dogs say woof, cats say meow, and cows say",
    "The human heart has four chambers:",
    "According to the latest report, unemployment",
    "He looked at the map and realised that",
    "One, two, three, four, five,",
)



def load_prompts(spec: str = "") -> list[str]:
    """Seed prompts: ``""`` -> :data:`DEFAULT_PROMPTS`; else a file with one prompt a line."""
    if not spec:
        return list(DEFAULT_PROMPTS)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"data.prompts={spec!r} is not a file (one seed prompt per line)")
    prompts = [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"data.prompts={spec!r} has no non-empty line")
    return prompts


@torch.no_grad()
def sample_lm_sequences(model: Any, tokenizer: Any, prompts: Sequence[str], n: int, new_tokens: int,
                        seed: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                        batch_size: int = 32, progress: bool = True) -> list[list[int]]:
    """Sample ``n`` continuations of ``new_tokens`` tokens from the LM (prompt i % len(prompts)).

    Batched with left padding; batch k is seeded with ``seed * 1_000_003 + k`` inside a forked RNG
    (the global RNG is untouched). Each returned sequence is prompt tokens + continuation, cut
    after the first end-of-sequence token. Returns n token-id lists.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    window = int(getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 0) or 0)
    longest = max(len(e) for e in encoded)
    if window and longest + new_tokens > window:
        raise ValueError(f"data.seq_len={new_tokens} + longest prompt ({longest} tokens) exceeds the "
                         f"model's context window {window}; lower data.seq_len")
    out: list[list[int]] = []
    batches = range(0, n, batch_size)
    for k, start in enumerate(tqdm(batches, desc="sampling sequences from the LM", disable=not progress)):
        idx = list(range(start, min(n, start + batch_size)))
        ids, mask = pad_left([encoded[i % len(encoded)] for i in idx], pad)
        kw: dict[str, Any] = dict(do_sample=temperature > 0, max_new_tokens=new_tokens, pad_token_id=pad,
                                  eos_token_id=eos)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + k)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        gen = gen.cpu()
        T = ids.shape[1]
        for row, i in enumerate(idx):
            prompt = encoded[i % len(encoded)]
            cont = gen[row, T:].tolist()
            if eos is not None and eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out.append(list(prompt) + cont)
    return out


def file_sequences(tokenizer: Any, path: str, seq_len: int, n: int = 0) -> list[list[int]]:
    """Tokenise a UTF-8 text file and cut it into chunks of ``seq_len`` tokens (the last chunk
    may be shorter, >= 2 tokens). ``n`` > 0 keeps the first n chunks."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.source=file needs data.path=FILE; '{path}' is not a file")
    ids = tokenizer(p.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    if n > 0:
        chunks = chunks[:n]
    if not chunks:
        raise ValueError(f"'{path}' holds fewer than 2 tokens")
    return chunks


def build_sequences(cfg: Any, lm: Any, progress: bool = True) -> list[list[int]]:
    """Sequences for ``cfg.data`` (a TrainConfig or DictConfig) from the loaded model ``lm``."""
    d = cfg.data
    if d.source == "lm":
        return sample_lm_sequences(lm.model, lm.tokenizer, load_prompts(d.prompts), d.n_sequences, d.seq_len,
                                   d.seed, d.temperature, d.top_p, d.gen_batch_size, progress)
    if d.source == "file":
        return file_sequences(lm.tokenizer, d.path, d.seq_len, d.n_sequences)
    raise ValueError(f"data.source={d.source!r}: use lm or file")


