"""Benchmark of the ``block`` sampler (speculative blocks): speed, acceptance and exactness, every arm
side by side in ONE process on the same held-out prompts (spindiff/data/eval_prompts.txt, disjoint
from the training seed prompts):

    python bench/bench_block.py --ckpt runs/train/block/checkpoints/last.ckpt     # ~20-30 min on 2 cores
    python bench/bench_block.py --ckpt PATH --quick                               # a few minutes

Scheduling arms at batch > 1 (``--schedule``): ``block[..](K)`` is the static batch (chunks of B
prompts, finished rows fed until the slowest row is done), ``+evict`` lets finished rows leave the
batch, ``+queue`` is continuous batching (every prompt of the cell through B rows; a finished row's
slot takes the next prompt, prefilled B at a time ahead of need); a queue arm runs once over all
prompts, the queue arms spread between the chunks of the other arms.

Arms: ``ar`` (HF ``generate``: the control, same model and dtype), ``block[<drafter>](K)`` for
K in --ks (the first drafter of --drafters in every cell, the others at batch 8, T = 1), and HF prompt-lookup decoding (``generate(...,
prompt_lookup_num_tokens=K)``, the peer arm; transformers supports it at batch 1 only), at batch 1
and batch 8, temperature 1 and greedy. Every arm's timed runs are interleaved batch by batch (arm A,
B, C on batch 1, then on batch 2 ...) so that the load of other processes on this shared machine
hits every arm alike; the ratios are the claim, not the absolute numbers.

Reported: tokens/s and the speed-up over ``ar`` (same batch, temperature); LM forwards (counted by
a hook on the model) and tokens per forward; acceptance by block offset; the ceiling (a cached
forward over K + 1 positions vs 1, median of --ceiling-reps, batch 1 and 8); continuation-level
exactness of every T = 1 arm (:func:`spindiff.evaluation.evaluate.token_excess`: mean of
log p(x_t | prefix) + H(p) over every generated token, 0 for exact sampling; 95% CI over
continuations, and block minus ``ar``); memory (parameters and the per-round buffers, computed).
Writes results.json, report.md and speedup.png to --out (default runs/bench/block-<timestamp>).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from spindiff.config import compose
from spindiff.evaluation.evaluate import excess_metrics, load_eval_prompts, token_excess
from spindiff.generation import GenerationSession, build_sampler
from spindiff.runtime import atomic_savefig, atomic_write_json, atomic_write_text, package_versions

SCHED_TAG = {"static": "", "evict": " +evict", "queue": " +queue"}
SETTINGS = {
    "full": dict(prompts=16, b1_prompts=4, tokens=24, ks=[2, 4, 8], ceiling_reps=15),
    "quick": dict(prompts=8, b1_prompts=2, tokens=16, ks=[2, 4], ceiling_reps=5),
}


class ForwardCounter:
    """Counts calls of the model's forward (one per LM forward, prefill included)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self.handle = model.register_forward_pre_hook(lambda m, a, kw: self._inc(), with_kwargs=True)

    def _inc(self) -> None:
        self.n += 1


def _sampler(session: GenerationSession, overrides: list[str]):
    cfg = compose("sample", ["ckpt=none", f"model.name={session.name}", *overrides])
    return build_sampler(cfg, session)


def _prompt_lookup(session: GenerationSession, k: int, greedy: bool):
    """HF prompt-lookup decoding through generate (batch 1)."""
    def gen(ids, mask, max_new, g):
        kw: dict[str, Any] = dict(max_new_tokens=max_new, min_new_tokens=max_new, prompt_lookup_num_tokens=k,
                                  pad_token_id=session.pad_id, eos_token_id=None, top_k=0)
        kw.update(do_sample=False, temperature=None, top_p=None) if greedy else kw.update(do_sample=True, top_p=1.0,
                                                                                            temperature=1.0)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
            out = session.model.generate(input_ids=ids, attention_mask=mask, **kw)
        return out[:, ids.shape[1]:]
    return gen


def parse_drafter(spec: str) -> tuple[str, str, Optional[int], str]:
    """``NAME[:VOCAB][=CKPT]`` -> (drafter, checkpoint or "", sampler.draft_vocab or None, label):
    e.g. ``heads``, ``heads:0`` (the whole vocabulary), ``potts_lowrank=runs/train/x/checkpoints/last.ckpt``."""
    head, _, path = spec.partition("=")
    name, _, vocab = head.partition(":")
    label = name + (f":{vocab}" if vocab else "") + (f"@{Path(path).parent.parent.name}" if path else "")
    return name, path, (int(vocab) if vocab else None), label


def _ckpt_block(path: str) -> int:
    """The number of offsets the draft heads of a checkpoint were trained for."""
    from spindiff.score.build import load_score

    return int(load_score(path).score_net.block)


def ceiling(session: GenerationSession, prompts: list[str], ks: Sequence[int], reps: int) -> dict[str, Any]:
    """Median time of a cached forward over n new positions / over 1, at batch 1 and 8."""
    from spindiff.generation.block import BlockLM

    lm = BlockLM(session.model, session.adapter, window=session.window)
    out: dict[str, Any] = {}
    for B in (1, 8):
        ids, mask = session.batch(session.encode((prompts * 8)[:B]))
        times: dict[int, float] = {}
        for n in [1] + [k + 1 for k in ks]:
            ts = []
            for _ in range(reps):
                state, *_ = lm.prefill(ids, mask)
                new = ids[:, -1:].expand(B, n).contiguous()
                t0 = time.perf_counter()
                lm.extend(state, new)
                ts.append(time.perf_counter() - t0)
            times[n] = statistics.median(ts)
        out[f"batch{B}"] = {f"{n}_positions": round(times[n] / times[1], 3) for n in times if n > 1}
        out[f"batch{B}"]["one_position_ms"] = round(times[1] * 1000, 2)
        # the limit of a block sampler with K drafts: every draft accepted and a free drafter
        out[f"batch{B}"].update({f"ceiling_speedup_K{n - 1}": round(n * times[1] / times[n], 3) for n in times if n > 1})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(SETTINGS["quick" if args.quick else "full"])
    s.update({k: v for k, v in (("tokens", args.tokens), ("prompts", args.prompts)) if v})
    ks = [int(k) for k in (args.ks.split(",") if args.ks else s["ks"])]
    drafters = [d for d in args.drafters.split(",") if d]
    schedules = [x for x in args.schedule.split(",") if x]
    queued: set[str] = set()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    session = GenerationSession.load(compose("sample", [f"model.name={args.model}"]).model)
    prompts = load_eval_prompts("", 0)[: s["prompts"]]
    seqs = session.encode(prompts, reserve=s["tokens"])
    counter = ForwardCounter(session.model)
    res: dict[str, Any] = {"settings": {**s, "ks": ks, "drafters": drafters, "ckpt": args.ckpt, "schedule": schedules,
                                        "threads": torch.get_num_threads()},
                           "load_start": _load(), "versions": package_versions(), "arms": {}}
    print(f"# ceiling (cached forward over n positions / 1), load {_load()}", flush=True)
    res["ceiling"] = ceiling(session, prompts, ks, s["ceiling_reps"]) if not args.no_ceiling else {}
    print(res["ceiling"], flush=True)
    cells = [(float(c.split(":")[0]), int(c.split(":")[1])) for c in args.cells.split(",") if c]
    for temp in (1.0, 0.0):
        for B in (1, 8):
            if (temp, B) not in cells:
                continue
            arms: dict[str, Any] = {"ar": _sampler(session, ["sampler.name=ar", f"sampler.temperature={temp}"])}
            for spec in (drafters if (temp == 1.0 and B == 8) else drafters[:1]):  # other drafters: the headline cell
                d, path, vocab, label = parse_drafter(spec)
                top = _ckpt_block(path or args.ckpt)
                for k in ks:
                    if k > top:
                        print(f"  skip block[{label}](K={k}): its checkpoint has heads for {top} offsets", flush=True)
                        continue
                    for sched in (schedules if B > 1 else ["static"]):  # one row: nothing to schedule
                        arm = _sampler(session, [
                            "sampler.name=block", f"sampler.block={k}", f"sampler.drafter={d}",
                            f"sampler.temperature={temp}", f"ckpt={path or args.ckpt}",
                            *([f"sampler.draft_vocab={vocab}"] if vocab is not None else [])])
                        arm.evict = sched == "evict"  # the queue always evicts (its drained tail)
                        if sched == "queue":
                            queued.add(f"block[{label}](K={k})" + SCHED_TAG[sched])
                        arms[f"block[{label}](K={k})" + SCHED_TAG[sched]] = arm
            if B == 1:
                for k in ks[:2]:
                    arms[f"prompt_lookup(K={k})"] = _prompt_lookup(session, k, temp == 0)
            use = seqs[: s["b1_prompts"]] if B == 1 else seqs
            tag = f"T={temp:g},B={B}"
            acc = {name: dict(tokens=0, seconds=0.0, forwards=0, conts=[], prompts=[], drafted=None, accepted=None,
                              row_forwards=0, rows=[]) for name in arms}
            chunks = list(range(0, len(use), B))
            # a queue arm runs once over all the cell's prompts, after chunk j (queue arms spread over the run)
            q_at = {name: chunks[min(j * len(chunks) // max(len(queued), 1), len(chunks) - 1)]
                    for j, name in enumerate(n for n in arms if n in queued)}
            for i in chunks:
                chunk = use[i:i + B]
                ids, mask = session.batch(chunk)
                for name, arm in arms.items():
                    if name in queued and q_at[name] != i:
                        continue
                    g = torch.Generator().manual_seed(1000 + i)
                    n0 = counter.n
                    t0 = time.perf_counter()
                    if callable(arm) and not hasattr(arm, "generate"):
                        new = arm(ids, mask, s["tokens"], g).cpu()
                        conts = [r.tolist() for r in new]
                    else:
                        if name in queued:  # continuous batching: every prompt of the cell, B rows at once
                            gb = arm.generate_queue(use, B, s["tokens"], g, stop_at_eos=False)
                        else:
                            gb = arm.generate(ids, mask, s["tokens"], g, stop_at_eos=False)
                        conts = [gb.tokens[b][gb.valid[b]].tolist() for b in range(gb.tokens.shape[0])]
                        last = getattr(arm, "last", {})
                        if "drafted" in last:
                            a = acc[name]
                            a["drafted"] = np.add(a["drafted"] or 0, last["drafted"]).tolist()
                            a["accepted"] = np.add(a["accepted"] or 0, last["accepted"]).tolist()
                            a["row_forwards"] += last["row_forwards"]
                            a["rows"].append(last["rows_per_forward"])
                    a = acc[name]
                    a["seconds"] += time.perf_counter() - t0
                    a["forwards"] += counter.n - n0
                    a["tokens"] += sum(len(c) for c in conts)
                    a["conts"] += conts
                    a["prompts"] += use if name in queued else chunk
            base = acc["ar"]["tokens"] / acc["ar"]["seconds"]
            for name, a in acc.items():
                row = {"tokens_per_s": a["tokens"] / a["seconds"], "speedup_vs_ar": a["tokens"] / a["seconds"] / base,
                       "lm_forwards": a["forwards"], "tokens": a["tokens"],
                       "tokens_per_forward_per_row": a["tokens"] / max(a["forwards"], 1) / min(B, len(use))}
                if a["row_forwards"]:  # block: per row actually fed (a prompt's prefill counts as one, as for ar)
                    row["tokens_per_forward_per_row"] = a["tokens"] / a["row_forwards"]
                    row["rows_per_forward"] = round(float(np.mean(a["rows"])), 3)
                if a["drafted"] is not None:
                    row["acceptance_by_offset"] = [round(x / max(d, 1), 4) for x, d in zip(a["accepted"], a["drafted"])]
                if temp == 1.0:
                    per_tok = token_excess(session.model, a["prompts"], a["conts"], session.pad_id)
                    row.update(excess_metrics(per_tok))
                    row["_per_cont"] = [float(np.mean(x)) for x in per_tok if x]
                res["arms"][f"{name} {tag}"] = row
                print(f"{tag:12s} {name:26s} {row['tokens_per_s']:7.2f} tok/s  x{row['speedup_vs_ar']:.2f}  "
                      f"tok/fwd {row['tokens_per_forward_per_row']:.2f}  "
                      + (f"excess {row['gen/excess']:+.3f} ± {row['gen/excess_ci']:.3f}  " if temp == 1.0 else "")
                      + (f"acc {row.get('acceptance_by_offset')}  rows/fwd {row['rows_per_forward']:.2f}  "
                         f"LM forwards {row['lm_forwards']}" if "acceptance_by_offset" in row else ""), flush=True)
    _exactness(res)
    res["memory"] = memory(session, args.ckpt, max(ks))
    res["load_end"] = _load()
    return res


def _exactness(res: dict[str, Any]) -> None:
    """block minus ar continuation excess (T = 1), Welch CI over continuations."""
    from scipy import stats

    out = {}
    for key, row in res["arms"].items():
        if not key.startswith("block") or "_per_cont" not in row:
            continue
        tag = key.rsplit(" ", 1)[1]
        ar = res["arms"][f"ar {tag}"]["_per_cont"]
        x, y = np.asarray(row["_per_cont"]), np.asarray(ar)
        diff = float(x.mean() - y.mean())
        se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
        out[key] = {"excess_minus_ar": round(diff, 4), "ci95": round(float(stats.norm.ppf(0.975)) * se, 4)}
    res["exactness"] = out
    for row in res["arms"].values():
        row.pop("_per_cont", None)


def memory(session: GenerationSession, ckpt: str, k: int) -> dict[str, float]:
    """Megabytes: the LM's parameters, the draft heads', the spin posterior model's (a default
    checkpoint's shape: a (2d, d) read-out and V scales / biases) and the block's per-round buffers
    at batch 8 (r: B K V and p: B (K+1) V floats, the K+1 extra cached positions)."""
    from spindiff.score.build import load_score

    mb = lambda n, bytes_=4: round(n * bytes_ / 2**20, 2)  # noqa: E731
    lm = sum(p.numel() for p in session.model.parameters())
    heads = sum(p.numel() for p in load_score(ckpt).score_net.parameters())
    d, V = session.dim, session.token_table.shape[0]
    c = session.model.config
    kv = 2 * c.num_hidden_layers * getattr(c, "num_key_value_heads", c.num_attention_heads) * (d // c.num_attention_heads)
    spin = 2 * d * d + 2 * V + d + 1
    buffers = 8 * k * V + 8 * (k + 1) * V + 8 * (k + 1) * kv
    return {"lm_params_mb": mb(lm), "draft_heads_mb": mb(heads), "spin_model_mb": mb(spin),
            "block_buffers_b8_mb": mb(buffers), "ratio_block_to_spin_total": round(
                (lm + heads + buffers) / (lm + spin + 8 * V * 3), 3)}


def _load() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def report(res: dict[str, Any], out: Path) -> None:
    lines = ["# bench_block", "", f"load average {res['load_start']} -> {res['load_end']} (shared 2-core machine)", "",
             "## Ceiling: cached forward over n positions / one position (median)", "", str(res["ceiling"]), "",
             "## Arms", "", "| arm | tok/s | x ar | tok/forward/row | rows/forward | excess (T=1) | acceptance by offset |",
             "|---|---|---|---|---|---|---|"]
    for key, r in res["arms"].items():
        exc = f"{r['gen/excess']:+.3f} ± {r['gen/excess_ci']:.3f}" if "gen/excess" in r else ""
        lines.append(f"| {key} | {r['tokens_per_s']:.2f} | {r['speedup_vs_ar']:.2f} | "
                     f"{r['tokens_per_forward_per_row']:.2f} | {r.get('rows_per_forward', '')} | {exc} | "
                     f"{r.get('acceptance_by_offset', '')} |")
    lines += ["", "## Exactness: block minus ar continuation excess (95% CI)", ""]
    lines += [f"- {k}: {v['excess_minus_ar']:+.4f} ± {v['ci95']:.4f}" for k, v in res["exactness"].items()]
    lines += ["", "## Memory (MB)", "", str(res["memory"])]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def figure(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, temp in zip(axes, ("1", "0")):
        for B, style in ((1, "o--"), (8, "s-")):
            for d in [parse_drafter(x)[3] for x in res["settings"]["drafters"]]:
                for tag in SCHED_TAG.values():
                    name = lambda k: f"block[{d}](K={k}){tag} T={temp},B={B}"  # noqa: E731
                    ks = [k for k in res["settings"]["ks"] if name(k) in res["arms"]]
                    if ks:
                        ys = [res["arms"][name(k)]["speedup_vs_ar"] for k in ks]
                        ax.plot(ks, ys, style, label=f"{d}{tag}, batch {B}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("K (drafts per LM forward)")
        ax.set_title(f"T = {temp}" if temp == "1" else "greedy")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("tokens/s over ar (same batch)")
    fig.tight_layout()
    atomic_savefig(fig, out / "speedup.png")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="an objective=block checkpoint (python train.py experiment=block)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m", help="model.name (tests use tiny-gpt2)")
    ap.add_argument("--ks", default="", help="comma-separated K (default 2,4,8; quick 2,4)")
    ap.add_argument("--drafters", default="heads", help="comma-separated sampler.drafter names, each NAME[:VOCAB][=CKPT] "
                    "(VOCAB: sampler.draft_vocab, e.g. heads:0 = the whole vocabulary; CKPT: another checkpoint, "
                    "e.g. potts_lowrank=PATH)")
    ap.add_argument("--cells", default="1:1,1:8,0:1,0:8", help="temperature:batch cells to run (0 = greedy)")
    ap.add_argument("--schedule", default="static,evict,queue", help="block scheduling arms at batch > 1: static (a "
                    "fixed batch, finished rows fed until the slowest is done), evict (finished rows leave the batch), "
                    "queue (continuous batching: a finished row's slot takes the next prompt of the cell)")
    ap.add_argument("--tokens", type=int, default=0, help="new tokens per continuation (default: the mode's)")
    ap.add_argument("--prompts", type=int, default=0, help="held-out prompts at batch 8 (default: the mode's)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the forward-cost ceiling")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    bad = [x for x in args.schedule.split(",") if x and x not in SCHED_TAG]
    if bad or not args.schedule:
        ap.error(f"--schedule {args.schedule}: choose from {', '.join(SCHED_TAG)} (comma-separated), e.g. "
                 "--schedule static,queue")
    out = Path(args.out or f"runs/bench/block-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    res = run(args)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", res)
    report(res, out)
    figure(res, out)
    print(f"wrote {out}/results.json, report.md, speedup.png", flush=True)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
    raise SystemExit(0)
