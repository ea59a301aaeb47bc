"""Reading score checkpoints safely, with errors that name the problem and the fix.

A spindiff checkpoint is a Lightning checkpoint (``out/checkpoints/{best,last}.ckpt``) whose
``hyper_parameters`` hold plain data only:

    config: the resolved TrainConfig (dict)
    meta:   {"format": "spindiff.score", "format_version": 1, "objective", "model_name",
             "model_requested", "dim", "vocab_size", "context_features", "context_dim",
             "score_net": constructor arguments, "feature_key", ...}

so ``sample.py`` rebuilds the score network, the SDE and the context features from the file
alone (:func:`spindiff.score.build.load_score`, no Lightning import).

Every read goes through ``torch.load(..., weights_only=True)``: a file that needs arbitrary
Python objects to unpickle is refused instead of executed. (Lightning 2.6 ``fit(ckpt_path=)`` and
``load_from_checkpoint`` pass ``weights_only=None`` to ``torch.load``, which torch >= 2.6 treats
as True for local files; :func:`spindiff.training.train.train` validates a resume checkpoint here first
and then passes ``weights_only=True`` explicitly.)
"""
from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

FORMAT = "spindiff.score"
FORMAT_VERSION = 2  # 2: posterior-over-vocabulary score (objective=posterior); 1: the retired tangent residual
REQUIRED_META = ("objective", "model_name", "dim", "vocab_size", "context_features", "context_dim", "score_net")

_TRAIN_HINT = "train one with `python train.py out=DIR` (it writes DIR/checkpoints/best.ckpt and last.ckpt)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix (a user error:
    :data:`spindiff.config_rules.USER_ERRORS` lists it, so the CLIs print one ``error:`` line)."""


def _torch_load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        glob = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", msg, flags=re.IGNORECASE)
        if glob:
            what = f" ({glob.group(1)})" if glob else ""
            raise CheckpointError(
                f"{path} contains Python objects that are not tensors or plain containers{what}; it is refused "
                f"unread (torch.load weights_only=True) because unpickling them would run code from the "
                f"file. It was not written by spindiff's train.py: {_TRAIN_HINT}.") from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+?)\n", msg + "\n")
        first = detail.group(1).strip() if detail else (msg.strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is corrupt or not a torch checkpoint file ({first}); {_TRAIN_HINT}, or "
                              "use the other file in the same checkpoints/ folder") from None
    except Exception as e:  # noqa: BLE001 - any failure to read a user's file is "unreadable", never a traceback
        # (junk bytes reach the unpickler as e.g. KeyError: 174812789; a cut zip as RuntimeError / BadZipFile)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (KeyError, IndexError)):
            first = f"{type(e).__name__} {first} while unpickling"
        raise CheckpointError(
            f"{path} is corrupt or truncated, or not a torch checkpoint at all ({first}). If a run was interrupted "
            f"while saving, use the other file in the same checkpoints/ folder (best.ckpt / last.ckpt); "
            f"otherwise {_TRAIN_HINT}.") from None


def load_checkpoint(path: str | os.PathLike, expect_model: str | None = None, expect_dim: int | None = None,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a spindiff score checkpoint.

    Args:
        path: a ``.ckpt`` written by ``train.py``.
        expect_model: the model the caller will use (``model.name``); a checkpoint trained on
            another model is an error (the spins live in that model's embedding space).
        expect_dim: the embedding dimension d the caller will use.
        map_location: as for ``torch.load``.

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters`` with ``config`` and ``meta``, ...).

    Raises:
        CheckpointError: missing, unreadable, corrupt, foreign, unsafe, non-finite or mismatched.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; {_TRAIN_HINT}")
    if path.is_dir():
        hint = [p.name for p in sorted(path.glob("*.ckpt"))] or [p.name for p in sorted(path.glob("checkpoints/*.ckpt"))]
        raise CheckpointError(f"{path} is a directory; pass a .ckpt file inside it"
                              + (f" (found: {', '.join(hint)})" if hint else f"; {_TRAIN_HINT}"))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; an interrupted save?); use the other file in the "
                              f"same checkpoints/ folder or {_TRAIN_HINT}")
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        kind = type(ckpt).__name__
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else []
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (a {kind}" + (f" with keys {keys}" if keys else "")
            + f", no 'state_dict'); a bare state dict or a Hugging Face file is not a score checkpoint: {_TRAIN_HINT}")
    hp = ckpt.get("hyper_parameters") or {}
    meta = hp.get("meta") if isinstance(hp, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a Lightning checkpoint but not a spindiff score checkpoint (no hyper_parameters.meta "
            f"with format '{FORMAT}'; hyper_parameters keys: {sorted(hp)[:8] if isinstance(hp, dict) else type(hp).__name__}); "
            f"{_TRAIN_HINT}")
    version = meta.get("format_version")
    if version == 1 and FORMAT_VERSION == 2:
        raise CheckpointError(f"{path} holds a tangent-residual score (checkpoint format 1, objective="
                              f"{meta.get('objective')}), the parameterisation spindiff replaced by the posterior over "
                              "the vocabulary; it cannot be sampled any more. Retrain: `python train.py out=DIR` "
                              "(or `python train.py objective=euclid_ddpm out=DIR` for the Euclidean baseline)")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this spindiff reads version "
                              f"{FORMAT_VERSION}. Retrain with this version ({_TRAIN_HINT}).")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing or not isinstance(hp.get("config"), dict):
        raise CheckpointError(f"{path} lacks {missing or ['config']} in its hyper_parameters (edited or written by "
                              f"an incompatible version); {_TRAIN_HINT}")
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not any(k.startswith("score_net.") for k in state):
        raise CheckpointError(f"{path} holds no score network weights (state_dict without 'score_net.*'); {_TRAIN_HINT}")
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} has non-finite (NaN/Inf) weights in {bad[:3]}; the run diverged. Use an earlier "
                              "checkpoint (best.ckpt) or retrain with a lower optim.lr")
    if expect_model is not None and expect_model != meta["model_name"] and expect_model != meta.get("model_requested"):
        raise CheckpointError(
            f"{path} was trained on model '{meta['model_name']}' but model '{expect_model}' is requested; the spins live "
            f"in one model's embedding space. Use model.name={meta['model_name']} or a checkpoint trained on "
            f"'{expect_model}' (python train.py model.name={expect_model}).")
    if expect_dim is not None and int(expect_dim) != int(meta["dim"]):
        raise CheckpointError(f"{path} has embedding dimension d={meta['dim']} but d={expect_dim} is expected; use a "
                              f"checkpoint trained on the same model")
    return ckpt


def checkpoint_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A short description of a validated checkpoint (for logs and run records)."""
    meta = ckpt["hyper_parameters"]["meta"]
    n_params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("score_net.") and torch.is_tensor(v))
    best = None
    for state in (ckpt.get("callbacks") or {}).values():  # Lightning's ModelCheckpoint state
        score = state.get("best_model_score") if isinstance(state, dict) else None
        if score is not None:
            best = float(score)
    return {"objective": meta["objective"], "model": meta["model_name"], "dim": meta["dim"],
            "vocab_size": meta["vocab_size"], "context_features": meta["context_features"],
            "eta_train": meta.get("score_net", {}).get("eta_train"),
            "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
            "score_net_params": n_params, "best_val_loss": best}
