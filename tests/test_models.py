"""Model layer: tiny models, dtype/device, fallback and its error, SmolLM2 cache, run records."""
from __future__ import annotations

import json

import pytest
import torch

from spindiff.config import ModelConfig, compose
from spindiff.lm.models import ModelLoadError, build_tiny_tokenizer, load_model
from spindiff.runtime import prepare_run, record_model, resolve_device, resolve_dtype


@pytest.mark.parametrize("name,family", [("tiny-gpt2", "gpt2"), ("tiny-llama", "llama")])
def test_tiny_models_load_and_record(name, family):
    lm = load_model(ModelConfig(name=name, dtype="float64"))
    assert lm.family == family and lm.name == name
    info = lm.info
    assert info["dtype"] == "float64" and info["used"] == name and info["context_window"] == 128
    ids = lm.tokenizer("A cat says", return_tensors="pt")["input_ids"]
    assert lm.model(input_ids=ids).logits.dtype == torch.float64


def test_tiny_models_are_seeded():
    a = load_model(ModelConfig(name="tiny-gpt2", tiny_seed=3)).model
    b = load_model(ModelConfig(name="tiny-gpt2", tiny_seed=3)).model
    c = load_model(ModelConfig(name="tiny-gpt2", tiny_seed=4)).model
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_tiny_tokenizer_is_bpe_with_multitoken_words():
    tok = build_tiny_tokenizer()
    assert len(tok(" Paris")["input_ids"]) == 1
    assert len(tok(" screwdriver")["input_ids"]) > 1
    assert tok.decode(tok("Lions are carnivores.")["input_ids"]) == "Lions are carnivores."


def test_dtype_and_device_errors():
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float32, float64, bfloat16"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


def test_unreachable_hub_model_without_fallback_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model(ModelConfig(name="gpt2-does-not-exist-anywhere", fallback=False))


def test_missing_local_dir_never_falls_back(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelConfig(name=str(tmp_path / "nope"), fallback=True))


def test_local_directory_loads_with_from_pretrained(tmp_path):
    lm = load_model(ModelConfig(name="tiny-llama"))
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(ModelConfig(name=str(tmp_path)))
    ids = lm.tokenizer("A dog says", return_tensors="pt")["input_ids"]
    assert torch.allclose(lm.model(input_ids=ids).logits, again.model(input_ids=ids).logits, atol=1e-6)
    assert again.source == str(tmp_path.resolve())


def test_run_record(tmp_path):
    cfg = compose("sample", [f"out={tmp_path/'run'}", "seed=7"])
    out = prepare_run(cfg, "sample")
    record_model(out, {"used": "tiny-gpt2"})
    rec = json.loads((out / "run.json").read_text())
    assert rec["seed"] == 7 and rec["model"]["used"] == "tiny-gpt2"
    assert rec["versions"]["torch"].startswith("2.") and "transformers" in rec["versions"]
    assert (out / "config.yaml").read_text().count("seed: 7") == 1


@pytest.mark.smollm2
@pytest.mark.slow
def test_gpt2_falls_back_to_smollm2_offline(monkeypatch, capsys, recwarn):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("spindiff.runtime._SHOWN", set())  # "once per process": earlier tests may have warned
    lm = load_model(ModelConfig(name="gpt2"))
    load_model(ModelConfig(name="gpt2"))  # a second load (a sweep, a bench) does not repeat it
    err = capsys.readouterr().err
    assert err.count("falling back to smollm2-135m") == 1 and err.startswith("warning: '")
    assert not [w for w in recwarn if "falling back" in str(w.message)]  # one style: no UserWarning too
    assert lm.name == "smollm2-135m" and lm.requested == "gpt2"
    assert lm.info["fallback_reason"]
    with pytest.raises(ModelLoadError, match="model.name=smollm2-135m"):
        load_model(ModelConfig(name="gpt2", fallback=False))


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_cache_roundtrip_and_greedy_berlin(tmp_path, smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(input_ids=ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Berlin"
    assert smollm2.info["n_layers"] == 30 and smollm2.info["n_kv_heads"] == 3


def test_tokenizers_come_back_left_padded_and_auto_is_the_bundled_default(monkeypatch):
    lm = load_model(ModelConfig(name="tiny-llama"))
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    calls = []
    monkeypatch.setattr("spindiff.lm.models.load_smollm2", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        ModelLoadError("stop here")))
    with pytest.raises(ModelLoadError, match="stop here"):
        load_model(ModelConfig(name="auto"))
    assert calls  # auto -> smollm2-135m


def test_bad_dtype_and_device_are_config_errors():
    from spindiff.config import ConfigError

    with pytest.raises(ConfigError, match="model.dtype='float8'"):
        resolve_dtype("float8")
    with pytest.raises(ConfigError, match="model.device='gpu'"):
        resolve_device("gpu")


def test_atomic_writes_respect_the_umask(tmp_path):
    import os
    import stat

    from spindiff.runtime import atomic_directory, atomic_savefig, atomic_write_text, file_lock

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as d:
            (d / "f").write_text("y")
        with file_lock(tmp_path / ".lock"):
            pass
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure()
        atomic_savefig(fig, tmp_path / "p.png")
        plt.close(fig)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == 0o640 and mode(tmp_path / "p.png") == 0o640
    assert mode(tmp_path / "d") == 0o750 and (tmp_path / "d" / "f").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[0] > 10


def test_saved_folder_of_another_family_loads_as_that_family(tmp_path):
    """A save_pretrained folder is `model.name=FOLDER` for any family entry (here Qwen3, q/k norms),
    and an architecture without an entry is refused naming its model_type."""
    import transformers

    tok = build_tiny_tokenizer()
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   pad_token_id=tok.pad_token_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    lm = load_model(ModelConfig(name=str(tmp_path / "qwen3"), dtype="float64"))
    assert lm.family == "qwen3" and lm.info["family"] == "qwen3"
    bloom = transformers.BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=len(tok))
    transformers.AutoModelForCausalLM.from_config(bloom).save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    with pytest.raises(ModelLoadError, match="model_type 'bloom' has no model family"):
        load_model(ModelConfig(name=str(tmp_path / "bloom"), dtype="float64"))
