"""``sample(cfg)``: token-by-token generation with a registered sampler; returns the results.

For each batch of prompts (left padded): one LM forward gives the context field N, the hidden
state and the logits of the last position; the sampler produces the next token (``spin``: reverse
LLG SDE from uniform noise on S^{d-1}, decoded by cosine against the unit unembedding rows;
``ar``: the LM's own sampling; ``euclid_ddpm``: Gaussian DDPM in embedding space); the token is
appended and the field recomputed from the KV cache; repeat until EOS or ``max_new_tokens``.

Writes to ``cfg.out`` (default ``runs/sample/<timestamp>``): ``config.yaml``, ``run.json``,
``samples.jsonl`` (one record per prompt: text, token ids and per-token diagnostics) and
``summary.json``; logs the summary to W&B (offline unless a key is configured). The run
directory is created only after the config, the prompts, the model and the checkpoint passed
their checks. ``model.name=auto`` (the default) takes the model a ``ckpt=PATH`` was trained on.
With ``stream=true`` stdout carries exactly the text -- each prompt followed by its continuation,
one blank line between prompts -- so ``python sample.py | ...`` gets nothing else; the header
(sampler, model), the timing line and notices (``note:`` / ``warning:``) go to stderr.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig

from spindiff.config import check, entry_config, register_check, register_user_error
from spindiff.runtime import (apply_threads, atomic_write_json, atomic_write_text, notice, prepare_run, quiet_third_party,
                              record_model, resolve_device)
from spindiff.generation import (DIAG_KEYS, GenerationBatch, GenerationSession, Sampler, SampleError,
                               build_sampler, get_sampler_class)

register_user_error(SampleError)

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
    """A SampleConfig as a DictConfig (the dataclass, a composed config or a plain mapping;
    :func:`spindiff.config.entry_config`, so this composes like the CLI)."""
    return entry_config("sample", cfg)


def resolve_model(cfg: DictConfig) -> None:
    """``model.name=auto`` with ``ckpt=PATH``: use the model the checkpoint was trained on (its
    name, revision and tiny-model seed), with a note; otherwise ``auto`` means smollm2-135m. An
    explicit ``model.name`` is kept (a mismatch with the checkpoint is then an error)."""
    if str(cfg.model.name) not in ("auto", ""):
        return
    spec = str(cfg.ckpt)
    if spec in ("auto", "none", "", "null"):
        from spindiff.lm.models import DEFAULT_NAME

        cfg.model.name = DEFAULT_NAME  # recorded in config.yaml as the model actually asked for
        return
    from spindiff.checkpoint import CheckpointError, load_checkpoint

    try:
        ck = load_checkpoint(spec)
    except CheckpointError as e:
        raise SampleError(f"ckpt={spec}: {e}") from None
    trained = ck["hyper_parameters"]["config"].get("model") or {}
    cfg.model.name = str(ck["hyper_parameters"]["meta"]["model_name"])
    for key in ("revision", "tiny_seed"):
        if key in trained and trained[key] is not None:
            cfg.model[key] = trained[key]
    notice(f"model.name=auto: using {cfg.model.name}, the model {spec} was trained on "
           "(give model.name=... to choose another)", kind="note")


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
    """The sample entry's checks that need no model (run by :func:`spindiff.config.check` for
    ``sample`` / ``evaluate`` configs once this module is imported, and at the start of
    :func:`sample`): raise :class:`SampleError` naming the problem and the fix. They live here,
    not in :mod:`spindiff.config_rules`, because they reach registries above the config layer --
    the sampler classes' own ``validate``, the integrators, the steering sources, the device --
    and raise generation's error type."""
    from spindiff.sphere import integrators

    if int(cfg.max_new_tokens) < 1:
        raise SampleError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1 (e.g. max_new_tokens=16)")
    if int(cfg.sampler.batch_size) < 1:
        raise SampleError(f"sampler.batch_size={cfg.sampler.batch_size}: must be >= 1 (e.g. sampler.batch_size=8)")
    get_sampler_class(cfg.sampler.name).validate(cfg.sampler)
    steppers = getattr(integrators, "INTEGRATORS", None) or getattr(integrators, "SAMPLERS", {})
    if "method" in cfg.sampler and steppers and cfg.sampler.method not in steppers:
        raise SampleError(f"sampler.method={cfg.sampler.method!r}: choose one of {', '.join(sorted(steppers))} "
                          "(e.g. sampler.method=geodesic_midpoint)")
    if cfg.prompts and not Path(cfg.prompts).is_file():
        raise SampleError(f"prompts={cfg.prompts}: no such file; give a text file with one prompt per line "
                          "(or prompt=\"...\" for a single prompt)")
    spec = str(cfg.ckpt)
    if spec not in ("auto", "none", "", "null") and not Path(spec).exists():
        raise SampleError(f"ckpt={spec}: no checkpoint at {spec}; train one with `python train.py out=DIR` "
                          "(it writes DIR/checkpoints/last.ckpt), or use ckpt=auto / ckpt=none")
    resolve_device(cfg.model.device)
    if cfg.get("steer") is not None:
        from spindiff.generation.steering import check_steer_config

        check_steer_config(cfg.steer)


register_check("sample", validate_config)


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
            # a sampler's own diagnostics beyond DIAG_KEYS (block: block_offset, accepted, draft_r, lm_p)
            d.update({k: _nan_to_none(float(v[b, i])) for k, v in gb.diag.items() if k not in DIAG_KEYS})
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
        if text.endswith("\ufffd"):  # a character split over tokens: wait for its remaining bytes
            return
        self._show(text)

    def finish(self, text: str) -> None:
        """Print what the stream held back (a trailing incomplete character): stdout then holds
        exactly ``text``, the record's continuation."""
        self._show(text)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
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
    check("sample", cfg)  # a programmatic call is checked exactly like the CLI
    apply_threads(cfg)  # runtime.threads
    resolve_model(cfg)
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
    if cfg.stream:  # stdout carries the text only: the header goes to stderr
        tag = " [FIELD-ONLY: no learned residual]" if sampler.field_only else ""
        print(f"# {sampler.label}{tag} on {session.name}", file=sys.stderr, flush=True)
    # --- block sampler (issue 18): continuous batching over every prompt when they do not fit one batch
    queue = getattr(sampler, "generate_queue", None) if (1 < bs < len(seqs)) else None
    if queue is not None:  # a finished row's slot takes the next prompt; records in the prompts' order
        with interventions, quiet_third_party():
            gb = queue(seqs, bs, int(cfg.max_new_tokens), gen, stop_at_eos=bool(cfg.stop_at_eos))
        seconds += gb.seconds
        records.extend(batch_records(session, sampler, prompts, gb, int(cfg.seed)))
        for j, r in enumerate(records if cfg.stream else ()):  # as a batch > 1 streams: each text when done
            print(("\n" if j else "") + r["prompt"] + r["text"], flush=True)
    # --- end block
    for start in (range(0, len(seqs), bs) if queue is None else ()):
        chunk, texts = seqs[start:start + bs], prompts[start:start + bs]
        ids, mask = session.batch(chunk)
        streamer = _Streamer(session.tokenizer) if (cfg.stream and len(chunk) == 1) else None
        if streamer is not None:
            sys.stdout.write(("\n" if start else "") + texts[0])
            sys.stdout.flush()
        with interventions, quiet_third_party():
            gb = sampler.generate(ids, mask, int(cfg.max_new_tokens), gen, stop_at_eos=bool(cfg.stop_at_eos),
                                  on_token=streamer)
        seconds += gb.seconds
        recs = batch_records(session, sampler, texts, gb, int(cfg.seed))
        records.extend(recs)
        if cfg.stream:
            if streamer is not None:
                streamer.finish(recs[0]["text"])
                print(flush=True)
            else:  # prompt and continuation, one blank line between prompts
                for j, r in enumerate(recs):
                    print(("\n" if start + j else "") + r["prompt"] + r["text"], flush=True)
    summary = summarize(records, seconds, sampler)
    summary["model"] = session.name
    if interventions:
        summary["interventions"] = interventions.describe()
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(out / "summary.json", summary)
    _log_wandb(cfg, out, summary)
    if cfg.stream:
        print(f"# {summary['n_tokens']} tokens in {summary['seconds']:.2f} s ({summary['tokens_per_s']} tok/s); "
              f"wrote {out / 'samples.jsonl'}", file=sys.stderr, flush=True)
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
    from spindiff.tracking import log_once

    log_once(cfg.wandb, out, cfg, {f"sample/{k}": v for k, v in summary.items()}, name=summary["label"],
             job_type="sample", group=cfg.wandb.group or "sample")
