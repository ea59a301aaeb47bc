"""Prompt sets (prompt, good, bad) and candidate tokenisation.

A prompt set is a list of rows ``{"prompt", "good", "bad"}`` (optional ``category``,
``reference_good``). ``prompt_id`` everywhere in the analysis is the 0-based row index.

Bundled sets (``analysis/data``):

- ``paper``: the paper's Appendix A table (20 rows). Row 16 ("Two dozen is equal to") has
  good = "twenty-four" as in the paper's table; the reference code uses "twenty", recorded as
  ``reference_good`` and selected with ``variant=reference``. Under ``candidates=first_token``
  both give the same first token on GPT-2 and SmolLM2 (" twenty").
- ``extended``: 276 factual-recall triples written for this project (capitals, currencies,
  opposites, animal sounds, counts, categories, colours, sequences, languages, ...); every
  candidate is a single token for the bundled SmolLM2.
- ``heldout``: 77 further triples, disjoint prompts, for replication.

User files: ``.jsonl`` (one object per line), ``.json`` (an array of objects, or
``{"prompts": [...]}``), ``.csv`` (header ``prompt,good,bad``). Malformed rows fail with the
line number.

Candidate rule (``first_token``, the paper's): the first token of ``" " + word`` (no special
tokens). ``full`` scores the whole tokenisation of ``" " + word`` appended to the prompt.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from spindiff.runtime import notice

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED = {"paper": DATA_DIR / "paper.jsonl", "extended": DATA_DIR / "extended.jsonl",
           "heldout": DATA_DIR / "heldout.jsonl"}
REQUIRED = ("prompt", "good", "bad")


class PromptFileError(ValueError):
    """A prompt file or row that cannot be used; the message names the line and the fix."""


class PromptTokenError(ValueError):
    """A prompt that cannot be run on this model (empty after tokenisation, too long)."""


@dataclass(frozen=True)
class PromptItem:
    """One row of a prompt set. ``line`` is the 1-based line in its file (0 if built in code)."""

    prompt: str
    good: str
    bad: str
    category: str = ""
    reference_good: str | None = None
    line: int = 0


@dataclass
class PromptSet:
    """An ordered prompt set; ``prompt_id`` = index into :attr:`items`."""

    items: list[PromptItem]
    name: str = "custom"
    source: str = ""
    variant: str = "paper"

    def __len__(self) -> int:
        return len(self.items)

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    @property
    def goods(self) -> list[str]:
        return [it.good for it in self.items]

    @property
    def bads(self) -> list[str]:
        return [it.bad for it in self.items]

    def subset(self, ids: Sequence[int]) -> "PromptSet":
        """Rows ``ids`` (prompt ids are renumbered: keep ``ids`` to map back)."""
        return PromptSet([self.items[i] for i in ids], self.name, self.source, self.variant)

    def with_variant(self, variant: str) -> "PromptSet":
        """``paper``: the paper's table; ``reference``: ``reference_good`` where a row has one
        (the reference code's "twenty" for "twenty-four")."""
        if variant not in ("paper", "reference"):
            raise ValueError(f"variant '{variant}': use paper or reference")
        if variant == "paper":
            return replace(self, variant=variant)
        items = [replace(it, good=it.reference_good) if it.reference_good else it for it in self.items]
        return PromptSet(items, self.name, self.source, variant)


def from_triples(triples: Sequence[tuple[str, str, str]], name: str = "inline") -> PromptSet:
    """A prompt set from ``[(prompt, good, bad), ...]`` (validated like a file)."""
    items = [_validate({"prompt": p, "good": g, "bad": b}, i + 1, name) for i, (p, g, b) in enumerate(triples)]
    return PromptSet(items, name=name, source="inline")


def _validate(row: Any, line: int, source: str) -> PromptItem:
    where = f"{source}, line {line}"
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected an object with fields prompt, good, bad; got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row or row[k] is None]
    if missing:
        raise PromptFileError(f"{where}: missing field(s) {', '.join(missing)} "
                              f"(every row needs prompt, good, bad; got {sorted(row)})")
    vals = {}
    for k in REQUIRED:
        v = row[k]
        if not isinstance(v, str):
            raise PromptFileError(f"{where}: field '{k}' must be a string, got {type(v).__name__} {v!r}")
        vals[k] = v.strip() if k != "prompt" else v.rstrip()
    if not vals["prompt"].strip():
        raise PromptFileError(f"{where}: empty prompt; write the context the model should continue")
    for k in ("good", "bad"):
        if not vals[k]:
            raise PromptFileError(f"{where}: empty '{k}' candidate; give a word the model could continue with")
    if vals["good"] == vals["bad"]:
        raise PromptFileError(f"{where}: good and bad are the same word '{vals['good']}'; choose a different foil")
    ref = row.get("reference_good")
    return PromptItem(vals["prompt"], vals["good"], vals["bad"], str(row.get("category", "") or ""),
                      ref if isinstance(ref, str) and ref else None, line)


def _load_jsonl(path: Path) -> list[PromptItem]:
    items = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                                  "each line must be an object like "
                                  '{"prompt": "...", "good": "...", "bad": "..."}') from None
        items.append(_validate(row, n, str(path)))
    return items


def _load_json(path: Path) -> list[PromptItem]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        start = text.index("[", text.index('"prompts"'))
    elif isinstance(data, list):
        start = text.index("[")
    else:
        raise PromptFileError(f"{path}, line 1: expected a JSON array of objects or {{\"prompts\": [...]}}")
    # walk the array to know each element's line
    dec = json.JSONDecoder()
    pos, items = start + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        row, end = dec.raw_decode(text, pos)
        items.append(_validate(row, text.count("\n", 0, pos) + 1, str(path)))
        pos = end
    return items


def _load_csv(path: Path) -> list[PromptItem]:
    items = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [k for k in REQUIRED if k not in header]
        if missing:
            raise PromptFileError(f"{path}, line 1: CSV header lacks {', '.join(missing)}; "
                                  f"the first line must name the columns prompt,good,bad (got {header})")
        reader.fieldnames = header
        for row in reader:
            if row.get(None):
                raise PromptFileError(f"{path}, line {reader.line_num}: more fields than the header has "
                                      "(quote prompts that contain commas)")
            if not any((v or "").strip() for v in row.values()):
                continue
            items.append(_validate({k: v for k, v in row.items() if k is not None}, reader.line_num, str(path)))
    return items


def load_prompts(spec: str, variant: str = "paper") -> PromptSet:
    """Load a bundled set (``paper`` | ``extended`` | ``heldout``) or a file (.jsonl/.json/.csv).

    Raises:
        PromptFileError: unknown name, missing file, malformed row (with its line number).
    """
    if spec in BUNDLED:
        path, name = BUNDLED[spec], spec
    else:
        path, name = Path(spec), Path(spec).stem
        if not path.exists():
            raise PromptFileError(f"prompt set '{spec}' is neither a bundled set ({', '.join(BUNDLED)}) "
                                  "nor an existing file")
    loaders = {".jsonl": _load_jsonl, ".json": _load_json, ".csv": _load_csv}
    if path.suffix.lower() not in loaders:
        raise PromptFileError(f"{path}: unknown prompt-file type '{path.suffix}'; use .jsonl, .json or .csv "
                              "with fields prompt, good, bad")
    items = loaders[path.suffix.lower()](path)
    if not items:
        raise PromptFileError(f"{path}: no prompts in the file; add rows with prompt, good, bad")
    return PromptSet(items, name=name, source=str(path)).with_variant(variant)


# --------------------------------------------------------------------------- tokenisation
@dataclass
class TokenizedSet:
    """A prompt set tokenised for one model.

    ids:        per prompt, the prompt's token ids (BOS first when ``add_bos``)
    good_ids / bad_ids: per prompt, the tokens of ``" " + word``
    good_first / bad_first: (P,) first candidate tokens (the paper's rule)
    multi_token: rows whose candidate is several tokens: {"prompt_id","which","word","tokens"}
    shared_first: prompt ids whose good and bad share their first token (dL = 0 by construction
        under first_token; excluded from the statistics with a warning)
    """

    pset: PromptSet
    ids: list[list[int]]
    good_ids: list[list[int]]
    bad_ids: list[list[int]]
    good_first: Tensor
    bad_first: Tensor
    multi_token: list[dict] = field(default_factory=list)
    shared_first: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int]) -> "TokenizedSet":
        idx = list(idx)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return TokenizedSet(self.pset.subset(idx), pick(self.ids), pick(self.good_ids), pick(self.bad_ids),
                            self.good_first[idx], self.bad_first[idx])


def tokenize_set(tokenizer: Any, pset: PromptSet, context_window: int, add_bos: bool = False,
                 candidates: str = "first_token", warn: bool = True) -> TokenizedSet:
    """Tokenise prompts and candidates, checking what would make the analysis meaningless.

    With ``warn``, multi-token candidates and pairs sharing their first token are reported as
    ``warning: ...`` lines on stderr (:func:`spindiff.runtime.notice`, once per message).

    Raises:
        PromptTokenError: a prompt with no tokens, or longer than ``context_window``.
    """
    if candidates not in ("first_token", "full"):
        raise ValueError(f"candidates='{candidates}': use first_token (the paper's rule) or full")
    bos = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise PromptTokenError("add_bos=true but the tokenizer has no BOS token; use add_bos=false")
        bos = [tokenizer.bos_token_id]
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, gids, bids, multi, shared = [], [], [], [], []
    for i, it in enumerate(pset.items):
        where = f"prompt_id {i}" + (f" ({pset.source}, line {it.line})" if it.line else "")
        p = bos + enc(it.prompt)
        if len(p) == len(bos):
            raise PromptTokenError(f"{where}: the prompt '{it.prompt}' has no tokens; give a non-empty context")
        g, b = enc(" " + it.good), enc(" " + it.bad)
        extra = max(len(g), len(b)) if candidates == "full" else 0
        if len(p) + extra > context_window:
            raise PromptTokenError(
                f"{where}: {len(p) + extra} tokens ({'prompt + longest candidate' if extra else 'prompt'}) "
                f"exceed the model's context window of {context_window}; shorten the prompt or remove the row")
        for which, word, toks in (("good", it.good, g), ("bad", it.bad, b)):
            if len(toks) > 1:
                multi.append({"prompt_id": i, "which": which, "word": word,
                              "tokens": tokenizer.convert_ids_to_tokens(toks)})
        if g[0] == b[0]:
            shared.append(i)
        ids.append(p), gids.append(g), bids.append(b)
    ts = TokenizedSet(pset, ids, gids, bids, torch.tensor([g[0] for g in gids]),
                      torch.tensor([b[0] for b in bids]), multi, shared)
    if warn and multi:
        listed = "; ".join(f"#{m['prompt_id']} {m['which']} '{m['word']}' -> {m['tokens']}" for m in multi[:8])
        listed += f"; ... ({len(multi) - 8} more, listed in the report)" if len(multi) > 8 else ""
        how = ("only the first token is scored (candidates=first_token, the paper's rule); "
               "candidates=full scores whole words") if candidates == "first_token" else \
              "scored as whole continuations (candidates=full); dL_theory still uses the first token"
        notice(f"{len(multi)} candidate(s) of '{pset.name}' are several tokens, {how}: {listed}")
    if warn and shared:
        notice(f"prompt ids {shared} of '{pset.name}': good and bad share their first token, so "
               "dL is 0 by construction under the first-token rule; they are excluded from the "
               "statistics (use candidates=full or other words)")
    return ts
