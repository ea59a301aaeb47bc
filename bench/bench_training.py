"""Training throughput: cached (memory-mapped) features vs recomputing them with the LM per batch.

Side by side, in one process, on the same pairs, network, optimizer and batch size:

* ``cached``               batches read from the feature cache (``spindiff.training.data``), then one
                           training step (loss, backward, AdamW step);
* ``recompute/prefix``     per batch, the context field provider runs on every prefix of the
                           batch (one batched, left-padded LM forward), then the same step;
* ``recompute/sequence``   per batch, one LM forward over the distinct whole sequences of the
                           batch (every position's features at once), then the same step --
                           the cheapest way to recompute.

    python bench/bench_training.py            # smollm2-135m (bundled): 11 min on 2 shared cores, 4 of them building features
    python bench/bench_training.py --quick    # fewer steps and pairs

Prints the table and the ratio cached / recompute (the acceptance bar is >= 5x).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from spindiff.config import compose
from spindiff.lm.tokens import pad_left as left_pad
from spindiff.training.cache import load_or_build_features
from spindiff.training.data import PairDataModule
from spindiff.training.features import prefix_features, sequence_features
from spindiff.lm.field import ContextFieldProvider
from spindiff.training.module import ScoreModule, build_parts, make_meta
from spindiff.lm.models import load_model


def _sequences(directory: Path) -> list[list[int]]:
    flat = np.load(directory / "sequences.npy")
    off = np.load(directory / "offsets.npy")
    return [flat[a:b].tolist() for a, b in zip(off[:-1], off[1:])]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and pairs")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cached-steps", type=int, default=None)
    ap.add_argument("--recompute-steps", type=int, default=None)
    ap.add_argument("--cache-dir", default="", help="feature cache root (default: a temp dir)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    cached_steps = args.cached_steps or (10 if args.quick else 40)
    recompute_steps = args.recompute_steps or (1 if args.quick else 2)
    torch.manual_seed(0)
    cache_root = args.cache_dir or tempfile.mkdtemp(prefix="spindiff-bench-")
    cfg = compose("train", [f"model.name={args.model}", f"data.cache_dir={cache_root}",
                            f"data.n_sequences={16 if args.quick else 48}", f"data.seq_len={24 if args.quick else 40}",
                            f"data.batch_size={args.batch_size}", "data.val_fraction=0"])
    lm = load_model(cfg.model)
    t0 = time.perf_counter()
    store, hit = load_or_build_features(cfg, lambda: lm, progress=True)
    build_s = time.perf_counter() - t0
    meta = make_meta(cfg, store.meta)
    net, sde, objective = build_parts(cfg, meta, token_norms=store.arrays.get("token_norms"))
    module = ScoreModule(net, sde, objective, config=OmegaConf.to_container(cfg, resolve=True), meta=meta)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    provider = ContextFieldProvider.from_config(cfg.field, lm.model)
    sequences = _sequences(store.directory)
    pad = lm.tokenizer.pad_token_id
    seq_of, pos_of = np.asarray(store.arrays["seq"]), np.asarray(store.arrays["pos"])
    spins, tokens = store.arrays["spin"], store.arrays["token"]
    dm = PairDataModule(store, cfg.data, seed=0)

    def step(batch: dict, k: int) -> None:
        loss = module(batch, torch.Generator().manual_seed(k))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches(n_steps: int):
        it = iter(dm.train_dataloader())
        for k in range(n_steps):
            try:
                yield k, next(it)
            except StopIteration:
                it = iter(dm.train_dataloader())
                yield k, next(it)

    results = {}
    # cached: the real data path (memmap reads through the DataLoader)
    step(next(iter(dm.train_dataloader())), 0)  # warm-up
    t = time.perf_counter()
    n = 0
    for k, batch in batches(cached_steps):
        step(batch, k)
        n += batch["spin"].shape[0]
    results["cached"] = (cached_steps, n, time.perf_counter() - t)

    rng = np.random.default_rng(0)

    def rows_of_batch() -> np.ndarray:
        return np.sort(rng.choice(dm.train_idx, size=min(args.batch_size, len(dm.train_idx)), replace=False))

    def target_part(rows: np.ndarray) -> dict:
        return {"spin": torch.from_numpy(np.asarray(spins[rows])), "token": torch.from_numpy(np.asarray(tokens[rows]))}

    # recompute per prefix: the provider on every (context) prefix of the batch
    prefix_features(provider, sequences, seq_of[:8], pos_of[:8], pad)  # warm-up of the LM
    t = time.perf_counter()
    n = 0
    for k in range(recompute_steps):
        rows = rows_of_batch()
        field, hidden = prefix_features(provider, sequences, seq_of[rows], pos_of[rows], pad)
        batch = {"field": field.float(), "hidden": hidden.float(), **target_part(rows)}
        step(batch, k)
        n += len(rows)
    results["recompute/prefix"] = (recompute_steps, n, time.perf_counter() - t)

    # recompute per sequence: one forward over the distinct whole sequences of the batch
    t = time.perf_counter()
    n = 0
    for k in range(recompute_steps):
        rows = rows_of_batch()
        uniq = np.unique(seq_of[rows])
        ids, mask = left_pad([sequences[s] for s in uniq], pad)
        F, H = sequence_features(provider, ids, mask)  # (S, T, D)
        T = ids.shape[1]
        where = {int(s): i for i, s in enumerate(uniq)}
        b_idx = torch.tensor([where[int(s)] for s in seq_of[rows]])
        cols = torch.tensor([T - len(sequences[int(s)]) + int(p) - 1 for s, p in zip(seq_of[rows], pos_of[rows])])
        batch = {"field": F[b_idx, cols].float(), "hidden": H[b_idx, cols].float(), **target_part(rows)}
        step(batch, k)
        n += len(rows)
    results["recompute/sequence"] = (recompute_steps, n, time.perf_counter() - t)

    rate = {k: v[1] / v[2] for k, v in results.items()}
    print(f"\nmodel {lm.name} (d={store.dim}, V={store.vocab_size}), {store.n} pairs from {len(sequences)} sequences, "
          f"batch {args.batch_size}, score net {sum(p.numel() for p in net.parameters()):,} params, "
          f"threads {torch.get_num_threads()}; feature cache {'hit' if hit else f'built in {build_s:.1f} s'}")
    print(f"{'mode':<22}{'steps':>7}{'examples':>10}{'seconds':>10}{'examples/s':>13}{'vs cached':>11}")
    for k, (steps, n, s) in results.items():
        print(f"{k:<22}{steps:>7}{n:>10}{s:>10.2f}{rate[k]:>13.1f}{rate['cached'] / rate[k]:>10.1f}x")
    ratio = rate["cached"] / rate["recompute/prefix"]
    ratio_seq = rate["cached"] / rate["recompute/sequence"]
    print(f"\ncached / recompute(prefix) = {ratio:.1f}x; cached / recompute(sequence) = {ratio_seq:.1f}x "
          f"(bar: >= 5x) -> {'PASS' if min(ratio, ratio_seq) >= 5 else 'FAIL'}")
    out = {"model": lm.name, "n_pairs": store.n, "batch_size": args.batch_size,
           "examples_per_s": rate, "ratio_prefix": ratio, "ratio_sequence": ratio_seq,
           "raw": {k: {"steps": v[0], "examples": v[1], "seconds": v[2]} for k, v in results.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
