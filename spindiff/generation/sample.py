"""``sample(cfg)``: token-by-token generation with a registered sampler; returns the results.

For each batch of prompts (left padded): one LM forward gives the context field N, the hidden
state and the logits of the last position; the sampler produces the next token (``spin``: reverse
LLG SDE from uniform noise on S^{d-1}, decoded by cosine against the unit unembedding rows;
``ar``: the LM's own sampling; ``euclid_ddpm``: Gaussian DDPM in embedding space); the token is
appended and the field recomputed from the KV cache; repeat until EOS or ``max_new_tokens``.

Writes to ``cfg.out`` (default ``runs/sample/<timestamp>``): ``config.yaml``, ``run.json``,
``samples.jsonl`` (one record per prompt: text, token ids and per-token diagnostics) and
``summary.json``; logs the summary to W&B (offline unless a key is configured).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from spindiff.runtime import atomic_write_json, atomic_write_text, prepare_run, record_model
from spindiff.generation import (DIAG_KEYS, GenerationBatch, GenerationSession, Sampler, SampleError,
                               build_sampler, get_sampler_class)

__all__ = ["SampleError", "SampleResult", "sample", "load_prompt_list", "validate_config", "as_config"]


@dataclass
class SampleResult:
    """What :func:`sample` returns.

    records: one dict per prompt (as written to samples.jsonl).
    summary: run-level numbers (tokens, tokens/s, mean diagnostics, perplexity under the LM).
    out: the run directory.
    sampler: the sampler's description (name, label, field_only, ckpt, steps ...).
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path
    sampler: dict[str, Any] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.records]


def as_config(cfg: Any) -> DictConfig:
    """A SampleConfig as a DictConfig (accepts the dataclass, a DictConfig or a plain dict)."""
    from spindiff.config import SampleConfig

    if isinstance(cfg, DictConfig):
        return cfg
    if is_dataclass(cfg):
        return OmegaConf.structured(cfg)
    return OmegaConf.merge(OmegaConf.structured(SampleConfig), OmegaConf.create(cfg))


def load_prompt_list(spec: str) -> list[str]:
    """Prompts from FILE: one a line; blank lines and lines starting with '#' are skipped; a
    literal ``\\n`` in a line is a newline."""
    path = Path(spec)
    if not path.exists():
        raise SampleError(f"prompts={spec}: no such file; give a text file with one prompt per line "
                          "(or prompt=\"...\" for a single prompt)")
    out = [ln.replace("\\n", "\n") for ln in path.read_text().splitlines()
           if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise SampleError(f"prompts={spec} holds no prompt (only blank or '#' lines); add one prompt per line")
    return out


def validate_config(cfg: DictConfig) -> None:
    """Checks that need no model: raise :class:`SampleError` naming the problem and the fix."""
    if int(cfg.max_new_tokens) < 1:
        raise SampleError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    if int(cfg.sampler.batch_size) < 1:
        raise SampleError(f"sampler.batch_size={cfg.sampler.batch_size}: must be >= 1")
    get_sampler_class(cfg.sampler.name).validate(cfg.sampler)
    if cfg.get("steer") is not None:
        from spindiff.generation.steering import check_steer_config

        check_steer_config(cfg.steer)


def _nan_to_none(x: float) -> Optional[float]:
    return None if (x is None or (isinstance(x, float) and not math.isfinite(x))) else round(float(x), 6)


def batch_records(session: GenerationSession, sampler: Sampler, prompts: Sequence[str], gb: GenerationBatch,
                  seed: int) -> list[dict[str, Any]]:
    """samples.jsonl records for one generated batch."""
    tok = session.tokenizer
    desc = sampler.describe()
    recs = []
    for b, prompt in enumerate(prompts):
        ids = gb.tokens[b][gb.valid[b]].tolist()
        diags = []
        for i, t in enumerate(ids):
            d = {"token_id": int(t), "piece": tok.decode([t]), "steps": gb.sde_steps}
            d.update({k: _nan_to_none(float(gb.diag[k][b, i])) for k in DIAG_KEYS})
            diags.append(d)
        recs.append({"prompt": prompt, "text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids,
                     "n_tokens": len(ids), "stop": gb.stop[b], "sampler": desc["sampler"], "label": desc["label"],
                     "field_only": desc["field_only"], "ckpt": desc["ckpt"], "seed": seed, "diagnostics": diags})
    return recs


def summarize(records: Sequence[dict[str, Any]], seconds: float, sampler: Sampler) -> dict[str, Any]:
    """Run-level summary: tokens, tokens/s, mean per-token diagnostics, LM perplexity."""
    n = sum(r["n_tokens"] for r in records)
    out: dict[str, Any] = {**sampler.describe(), "n_prompts": len(records), "n_tokens": n,
                           "seconds": round(seconds, 4), "tokens_per_s": round(n / seconds, 3) if seconds > 0 else None,
                           "eos_stops": sum(r["stop"] == "eos" for r in records)}
    for k in DIAG_KEYS:
        vals = [d[k] for r in records for d in r["diagnostics"] if d.get(k) is not None]
        out[f"mean_{k}"] = round(sum(vals) / len(vals), 6) if vals else None
    if out.get("mean_lm_logprob") is not None:
        out["perplexity"] = round(math.exp(-out["mean_lm_logprob"]), 4)
    return out


class _Streamer:
    """Prints a single sequence's continuation as tokens arrive (re-decoding the whole suffix so
    multi-byte characters split over tokens print correctly)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, i: int, tok: torch.Tensor) -> None:
        self.ids.append(int(tok.reshape(-1)[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def sample(cfg: Any, session: Optional[GenerationSession] = None) -> SampleResult:
    """Generate continuations for ``cfg.prompt`` (or every line of ``cfg.prompts``).

    Args:
        cfg: a SampleConfig (dataclass or DictConfig from ``compose("sample", ...)``).
        session: a loaded :class:`GenerationSession` to reuse (default: load ``cfg.model``).

    Returns:
        :class:`SampleResult` (records as written to ``samples.jsonl``, summary, run directory).

    Raises:
        SampleError (a ValueError): empty prompt, prompt longer than the context window,
            eta < 0, steps < 1, an unknown sampler, a checkpoint for another model or d, ...
    """
    cfg = as_config(cfg)
    validate_config(cfg)
    prompts = load_prompt_list(cfg.prompts) if cfg.prompts else [str(cfg.prompt or "")]
    for i, p in enumerate(prompts):
        if not p.strip():
            raise SampleError("the prompt is empty; give text with prompt=\"...\" or prompts=FILE"
                              if len(prompts) == 1 else f"prompt {i} is empty")
    if session is None:
        session = GenerationSession.load(cfg.model)
    seqs = session.encode(prompts, reserve=int(cfg.max_new_tokens))
    sampler = build_sampler(cfg, session)
    interventions = lm_interventions(cfg, session)  # head gains / activation addition in the LM forward
    out = prepare_run(cfg, "sample")
    record_model(out, session.lm.info)
    gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    bs = int(cfg.sampler.batch_size)
    records: list[dict[str, Any]] = []
    seconds = 0.0
    if cfg.stream:
        tag = " [FIELD-ONLY: no learned residual]" if sampler.field_only else ""
        print(f"# {sampler.label}{tag} on {session.name}", flush=True)
    for start in range(0, len(seqs), bs):
        chunk, texts = seqs[start:start + bs], prompts[start:start + bs]
        ids, mask = session.batch(chunk)
        streamer = _Streamer(session.tokenizer) if (cfg.stream and len(chunk) == 1) else None
        if streamer is not None:
            sys.stdout.write(f"\n>>> {texts[0]}")
            sys.stdout.flush()
        with interventions:
            gb = sampler.generate(ids, mask, int(cfg.max_new_tokens), gen, stop_at_eos=bool(cfg.stop_at_eos),
                                  on_token=streamer)
        seconds += gb.seconds
        recs = batch_records(session, sampler, texts, gb, int(cfg.seed))
        records.extend(recs)
        if cfg.stream:
            if streamer is not None:
                print(flush=True)
            else:
                for r in recs:
                    print(f"\n>>> {r['prompt']}{r['text']}", flush=True)
    summary = summarize(records, seconds, sampler)
    summary["model"] = session.name
    if interventions:
        summary["interventions"] = interventions.describe()
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(out / "summary.json", summary)
    _log_wandb(cfg, out, summary)
    if cfg.stream:
        print(f"\n# {summary['n_tokens']} tokens in {summary['seconds']:.2f} s ({summary['tokens_per_s']} tok/s); "
              f"wrote {out / 'samples.jsonl'}", flush=True)
    return SampleResult(records, summary, out, sampler.describe())


def lm_interventions(cfg: DictConfig, session: GenerationSession) -> Any:
    """The LM-forward interventions of ``cfg.steer`` (head gains, activation addition) as one
    installable :class:`spindiff.lm.interventions.Interventions` (empty when none)."""
    from spindiff.lm.interventions import Interventions, interventions_from_config
    from spindiff.generation.steering import steering_words

    steer = cfg.get("steer")
    if steer is None:
        return Interventions()
    return interventions_from_config(steer, session.model, session.adapter, session.tokenizer,
                                     words=steering_words(steer.get("words", "")), model_name=session.name)


def _log_wandb(cfg: DictConfig, out: Path, summary: dict[str, Any]) -> None:
    from spindiff.tracking import init_run, resolve_mode

    if resolve_mode(cfg.wandb.mode) == "disabled":
        return
    run = init_run(cfg.wandb, out, cfg, name=summary["label"], job_type="sample",
                   group=cfg.wandb.group or "sample")
    run.log({f"sample/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
    run.finish()
