"""Held-out fidelity of trained posterior score models against the amount of training text.

The sampler's target distribution over the vocabulary is softmax(logits_v(ctx)) (the logits do not
depend on S or t: ``spindiff.score.model.PosteriorScoreModel``), so its distance from the LM can be
computed exactly, without the finite-sample floor of a sampling benchmark. For every checkpoint:

    KL(p_LM || q_model), TV(p_LM, q_model), top-1 agreement,

teacher-forced at every position of the 40 held-out evaluation prompts (``spindiff/data/eval_prompts.txt``,
human-written, disjoint from the training seed prompts) and of their LM continuations (``--new-tokens``
sampled tokens each, a fixed seed). The limit arms are in the same table: ``lm-head`` (c = 0, g = 1:
the LM's own logits, the exact limit, KL = 0 up to float error) and ``prior`` (the field prior alone,
what an untrained network gives).

    python bench/bench_data_scaling.py --ckpt n256=runs/quickstart/train/checkpoints/last.ckpt \\
        --ckpt n768=runs/scaling/n768/checkpoints/last.ckpt --ckpt n2304=runs/scaling/n2304/checkpoints/last.ckpt

Each checkpoint's number of training pairs, sequences and steps is read from the checkpoint itself.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from spindiff.config import compose
from spindiff.evaluation.evaluate import kl_divergence, load_eval_prompts, mean_ci, total_variation
from spindiff.runtime import atomic_write_json, atomic_write_text
from spindiff.generation.session import GenerationSession
from spindiff.training.features import sequence_features


@torch.no_grad()
def contexts(session: GenerationSession, field_cfg, prompts, new_tokens: int, seed: int):
    """Field, hidden state and LM log-probabilities at every real position (prompt + continuation)."""
    lm = session.lm
    seqs = session.encode(prompts)
    if new_tokens:
        torch.manual_seed(seed)
        ids, mask = session.batch(seqs)
        out = lm.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                temperature=1.0, max_new_tokens=new_tokens, pad_token_id=session.pad_id)
        seqs = [s + out[i, ids.shape[1]:].tolist() for i, s in enumerate(seqs)]
    provider = session.provider(field_cfg)
    vocab = session.token_table.shape[0]
    rows = {"field": [], "hidden": [], "logp": [], "group": []}
    for i, s in enumerate(seqs):  # one sequence at a time: no padding to mask out
        ids = torch.tensor([s], device=session.device)
        # one forward: field, hidden state and the LM's next-token log-probabilities (all V of them,
        # returned sorted with their ids, scattered back to vocabulary order)
        field, hidden, top_ids, top_logp = sequence_features(provider, ids, torch.ones_like(ids), targets_k=vocab)
        rows["field"].append(field[0])
        rows["hidden"].append(hidden[0])
        rows["logp"].append(torch.empty_like(top_logp[0]).scatter_(-1, top_ids[0], top_logp[0]))
        rows["group"].append(torch.full((len(s),), i))
    return {k: torch.cat(v) for k, v in rows.items()}


@torch.no_grad()
def lm_head_limit(net, session: GenerationSession):
    """The same network with c = 0, readout 0, gate g = 1, s_v = |W_U,v|, b = 0: it computes h . W_U,v,
    the LM's own logits, through the model's own code path (the limit the training can reach)."""
    lim = copy.deepcopy(net)
    if getattr(lim, "gate", None) is None:
        return None
    if lim.has_prior_weight:
        lim.prior_weight.zero_()
    elif lim.prior != "none":
        return None
    lim.readout.weight.zero_()
    if lim.mlp is not None:
        lim.mlp[-1].weight.zero_()
        lim.mlp[-1].bias.zero_()
    lim.gate.fill_(1.0)
    head = session.lm.model.get_output_embeddings()
    lim.scale.copy_(head.weight.detach().float().norm(dim=-1))
    lim.bias.copy_(head.bias.detach() if getattr(head, "bias", None) is not None else torch.zeros_like(lim.bias))
    return lim


def exact_metrics(logits: torch.Tensor, logp: torch.Tensor, group: torch.Tensor) -> dict:
    """KL(p_LM || q), TV and top-1 agreement of the model's logits against the LM's log-probabilities,
    per context, averaged per held-out sequence (``group``), with the 95% CI over sequences."""
    p, q = logp.exp(), torch.softmax(logits.float(), -1)
    per_ctx = {"kl": kl_divergence(p, q), "tv": total_variation(p, q),
               "top1": (q.argmax(-1) == p.argmax(-1)).double()}
    out = {}
    for name, v in per_ctx.items():
        m, h = mean_ci([float(v[group == g].mean()) for g in group.unique()])
        out[name], out[name + "_ci"] = m, h
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", default=[], metavar="LABEL=PATH", help="a trained checkpoint")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-prompts", type=int, default=0, help="first N evaluation prompts (0: all 40)")
    ap.add_argument("--out", default="runs/bench/data-scaling")
    args = ap.parse_args(argv)
    if not args.ckpt:
        ap.error("give at least one --ckpt LABEL=PATH")
    t0 = time.time()
    cfg = compose("sample", [f"model.name={args.model}"])
    session = GenerationSession.load(cfg.model)
    table = session.token_table
    data = None
    rows, limits = [], []
    for spec in args.ckpt:
        label, _, path = spec.rpartition("=")  # the label may contain "=", the path rarely does
        module = session.score_module(path)
        if data is None:
            data = contexts(session, module.meta.get("field", cfg.field), load_eval_prompts("", args.n_prompts), args.new_tokens,
                            args.seed)
        net = module.score_net
        with torch.no_grad():
            logits = net(data["field"], data["hidden"], None, table)
            if not limits:  # the limit arms, once (from the first checkpoint's parameterisation)
                lim = lm_head_limit(net, session)
                if lim is not None:
                    limits.append({"arm": "limit: c=0, g=1, s=row norms of W_U (the LM head)", **exact_metrics(
                        lim(data["field"], data["hidden"], None, table), data["logp"], data["group"])})
                limits.append({"arm": f"prior:{net.prior} alone (untrained)", **exact_metrics(
                    net.prior_logits(data["field"], None, table), data["logp"], data["group"])})
        meta = module.meta
        rows.append({"arm": label, "n_pairs": meta.get("n_pairs"), "n_sequences": meta.get("n_sequences"),
                     "steps": module.step, **exact_metrics(logits, data["logp"], data["group"])})
    rows = limits + rows
    n_ctx = int(data["group"].numel())
    lines = [f"# Data scaling: exact held-out fidelity of the model's vocabulary distribution\n",
             f"Model {session.name}; {n_ctx} teacher-forced contexts = every position of the {int(data['group'].max()) + 1} held-out "
             f"prompts + {args.new_tokens} LM-sampled tokens each (seed {args.seed}); mean ± 95% CI over the "
             f"sequences; {time.time() - t0:.0f} s.\n",
             "| arm | training pairs | sequences | steps | KL(p_LM ‖ q) | TV | top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r.get('n_pairs', '–')} | {r.get('n_sequences', '–')} | {r.get('steps', '–')} | "
                     f"{r['kl']:.4f} ± {r['kl_ci']:.4f} | {r['tv']:.4f} ± {r['tv_ci']:.4f} | "
                     f"{r['top1']:.3f} ± {r['top1_ci']:.3f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", report)
    atomic_write_json(out / "results.json", {"rows": rows, "n_contexts": n_ctx, "args": vars(args)})
    return {"rows": rows}


if __name__ == "__main__":
    main()
