"""Training data: whole-sequence features equal the provider run per prefix, the cache is built
once and memory-mapped, the split is by sequence, the sampler/loader resume mid-epoch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from spindiff.config import compose
from spindiff.lm.tokens import pad_left as left_pad
from spindiff.score.features import context_dim, context_features
from spindiff.training.cache import FeatureStore, feature_cache_dir, load_or_build_features
from spindiff.training.data import EpochSampler, PairDataModule, PairDataset, ResumableDataLoader, collate_batch
from spindiff.training.features import compute_features, prefix_features, sequence_features
from spindiff.training.sequences import DEFAULT_PROMPTS, file_sequences, sample_lm_sequences
from spindiff.lm.field import ContextFieldProvider


def _seqs(model, tok, n=4, new=8):
    return sample_lm_sequences(model, tok, DEFAULT_PROMPTS[:3], n, new, seed=0, batch_size=3, progress=False)


@pytest.mark.parametrize("heads,final_norm,normalize", [("all", True, True), ("L1,L0H1", False, False),
                                                        ("L0H0", True, False)])
def test_sequence_features_equal_per_prefix_provider(tiny_model, heads, final_norm, normalize):
    """One forward over whole (left-padded) sequences gives, at every position, the provider's
    field and hidden state for the prefix ending there."""
    model, tok = tiny_model
    seqs = _seqs(model, tok)
    prov = ContextFieldProvider(model, heads, "in_situ", normalize=normalize, final_norm=final_norm)
    ids, mask = left_pad(seqs, tok.pad_token_id)
    assert (mask == 0).any()  # ragged batch
    field, hidden = sequence_features(prov, ids, mask)  # (B, T, D)
    T = ids.shape[1]
    for i, s in enumerate(seqs):
        L = len(s)
        ref_f, ref_h = prefix_features(prov, seqs, [i] * (L - 1), list(range(1, L)), tok.pad_token_id)
        for p in range(1, L, 5):  # also a single unpadded prefix through the provider itself
            single = prov(torch.tensor([s[:p]]))
            assert torch.allclose(single.field[0], ref_f[p - 1], atol=1e-10)
        assert torch.allclose(field[i, T - L:T - 1], ref_f, atol=1e-10)
        assert torch.allclose(hidden[i, T - L:T - 1], ref_h, atol=1e-10)


def test_compute_features_rows_and_targets(tiny_gpt2):
    model, tok = tiny_gpt2
    seqs = _seqs(model, tok, n=5)
    prov = ContextFieldProvider(model, "all", "in_situ")
    arr = compute_features(prov, seqs, tok.pad_token_id, None, batch_size=2, progress=False)
    n = sum(len(s) - 1 for s in seqs)
    assert arr["field"].shape == (n, 64) and arr["token"].shape == (n,)
    # every row's target is the next token of its sequence, spin = its unit unembedding row
    for r in range(0, n, 7):
        s, p = int(arr["seq"][r]), int(arr["pos"][r])
        assert arr["token"][r] == seqs[s][p]
        row = model.get_output_embeddings().weight[seqs[s][p]].detach().float()
        assert np.allclose(arr["spin"][r], (row / row.norm()).numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(arr["spin"], axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(arr["field"], axis=1), 1, atol=1e-5)
    # the paper protocol goes through the provider per prefix
    paper = ContextFieldProvider(model, "all", "paper_fixed")
    arr2 = compute_features(paper, seqs, tok.pad_token_id, None, batch_size=2, progress=False)
    f, _ = prefix_features(paper, seqs, arr2["seq"][:10], arr2["pos"][:10], tok.pad_token_id)
    assert np.allclose(arr2["field"][:10], f.float().numpy(), atol=1e-6)


def test_lm_sampling_is_seeded_and_cut_at_eos(tiny_gpt2):
    model, tok = tiny_gpt2
    a = sample_lm_sequences(model, tok, DEFAULT_PROMPTS[:2], 3, 6, seed=1, batch_size=2, progress=False)
    b = sample_lm_sequences(model, tok, DEFAULT_PROMPTS[:2], 3, 6, seed=1, batch_size=2, progress=False)
    c = sample_lm_sequences(model, tok, DEFAULT_PROMPTS[:2], 3, 6, seed=2, batch_size=2, progress=False)
    assert a == b and a != c
    rng = torch.get_rng_state()
    sample_lm_sequences(model, tok, DEFAULT_PROMPTS[:1], 1, 3, seed=0, progress=False)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched
    for i, s in enumerate(a):
        prompt = tok(DEFAULT_PROMPTS[i % 2])["input_ids"]
        assert s[:len(prompt)] == prompt and 1 <= len(s) - len(prompt) <= 6
        assert tok.eos_token_id not in s[len(prompt):-1]  # cut after the first end-of-sequence token


def test_file_source(tiny_gpt2, tmp_path):
    _, tok = tiny_gpt2
    p = tmp_path / "t.txt"
    p.write_text("The capital of France is Paris. " * 20)
    chunks = file_sequences(tok, str(p), 16, n=3)
    assert len(chunks) == 3 and all(len(c) == 16 for c in chunks)
    with pytest.raises(FileNotFoundError, match="data.path"):
        file_sequences(tok, str(tmp_path / "missing.txt"), 16)


def _cfg(tmp_path, *extra):
    return compose("train", ["experiment=quick", f"data.cache_dir={tmp_path / 'cache'}", "data.n_sequences=6",
                             "data.seq_len=10", *extra])


def test_cache_built_once_memmapped_and_keyed(tmp_path):
    cfg = _cfg(tmp_path)
    calls = []

    def loader():
        from spindiff.lm.models import load_model

        calls.append(1)
        return load_model(cfg.model)

    store, hit = load_or_build_features(cfg, loader, progress=False)
    assert not hit and len(calls) == 1
    assert isinstance(store.arrays["field"], np.memmap)
    meta = json.loads((store.directory / "meta.json").read_text())
    assert meta["n_pairs"] == store.n and meta["dim"] == 64 and meta["model_name"] == "tiny-gpt2"
    store2, hit2 = load_or_build_features(cfg, loader, progress=False)
    assert hit2 and len(calls) == 1  # the LM is not loaded again
    assert np.array_equal(store2.arrays["field"], store.arrays["field"])
    # the key follows the model, field and data settings but not batch size or split
    assert feature_cache_dir(_cfg(tmp_path, "data.batch_size=7", "data.val_fraction=0.3")) == store.directory
    for change in ("field.heads=L0", "data.seq_len=11", "model.tiny_seed=1", "field.final_norm=false"):
        assert feature_cache_dir(_cfg(tmp_path, change)) != store.directory
    # no temporary directory is left behind
    assert [p.name for p in store.directory.parent.iterdir() if not p.name.startswith(".")] == [store.directory.name]
    # cache=false computes in memory
    mem, hit3 = load_or_build_features(_cfg(tmp_path, "data.cache=false"), loader, progress=False)
    assert not hit3 and mem.directory is None and np.allclose(mem.arrays["field"], store.arrays["field"])


def test_split_by_sequence_and_batches(tmp_path):
    cfg = _cfg(tmp_path, "data.val_fraction=0.34")
    store, _ = load_or_build_features(cfg, lambda: __import__("spindiff.lm.models").lm.models.load_model(cfg.model),
                                      progress=False)
    dm = PairDataModule(store, cfg.data, seed=0)
    seq = np.asarray(store.arrays["seq"])
    assert set(seq[dm.train_idx]).isdisjoint(set(seq[dm.val_idx]))
    assert len(dm.train_idx) + len(dm.val_idx) == store.n and len(set(seq[dm.val_idx])) == 2
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"field", "hidden", "spin", "token", "target_ids", "target_logp"}
    assert batch["field"].shape == (min(64, len(dm.train_idx)), 64) and batch["token"].dtype == torch.long
    with pytest.raises(ValueError, match="val_fraction"):
        store.split(0.99)


def test_context_features():
    f, h = torch.randn(3, 8), 5 * torch.randn(3, 8)
    assert context_features(f, h, "none") is None
    c = context_features(f, h, "field+hidden")
    assert c.shape == (3, 16) == (3, context_dim("field+hidden", 8))
    assert torch.allclose(c[:, 8:].norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="features"):
        context_dim("logits", 8)


def test_sampler_is_deterministic_sharded_and_resumable():
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    a = list(s)
    assert sorted(a) == list(range(10)) and a == list(s)
    s.set_epoch(2)
    assert list(s) != a
    shards = [list(EpochSampler(10, 3, True, 3, r)) for r in range(3)]
    assert all(len(x) == 4 for x in shards) and set(sum(shards, [])) == set(range(10))

    class Arange(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitems__(self, idx):
            return {"i": torch.tensor(idx)}

    def loader():
        return ResumableDataLoader(Arange(), batch_size=3, sampler=EpochSampler(10, seed=5), collate_fn=collate_batch)

    full = loader()
    full.sampler.set_epoch(4)
    batches = [b["i"].tolist() for b in full]
    it_loader = loader()
    it_loader.sampler.set_epoch(4)
    it = iter(it_loader)
    first = [next(it)["i"].tolist() for _ in range(2)]
    state = it_loader.state_dict()
    assert state == {"epoch": 4, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert first + [b["i"].tolist() for b in resumed] == batches
