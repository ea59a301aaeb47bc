"""Config system: every entry config composes, overrides apply, misspelt keys fail naming the key."""
from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

# the entry modules register the checks that need registries above the config (sampler classes,
# objectives, device) as the CLIs do by importing them; spindiff.config imports none of them
import spindiff.evaluation.evaluate  # noqa: F401
import spindiff.generation.sample  # noqa: F401
import spindiff.training.train  # noqa: F401
from spindiff.config import ENTRY_SCHEMAS, ConfigError, compose, help_text, parse_cli, to_object


def test_config_imports_no_entry_module_and_checks_its_rules_alone():
    """Issue 19: no upward import -- composing and checking loads no module above the config
    (no importlib of the entry modules); the schema rules (trainer.*, weighting, eval.prompts)
    still run on a bare ``import spindiff.config``."""
    code = """
import sys
from spindiff.config import ConfigError, compose
for entry, bad, says in (("train", "trainer.max_steps=0", "trains nothing"), ("train", "weighting=x", "weighting='x'"),
                         ("sample", "sde.schedule=x", "sde.schedule='x'"),
                         ("evaluate", "eval.prompts=/no/such.txt", "no such file")):
    try:
        compose(entry, ["model.name=tiny-gpt2", bad])
        raise SystemExit(f"{bad}: no error")
    except ConfigError as e:
        assert says in str(e), e
compose("train"), compose("sample"), compose("evaluate")
above = sorted(m for m in sys.modules if m.startswith("spindiff.") and not m.startswith(
    ("spindiff.config", "spindiff.config_rules", "spindiff.config_schema", "spindiff.sphere", "spindiff.score",
     "spindiff.checkpoint")))  # the bottom layers (checkpoint imports nothing of spindiff)
assert not above, above
assert not [m for m in sys.modules if m in ("spindiff.sphere.integrators", "spindiff.score.model")], sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("entry", sorted(ENTRY_SCHEMAS))
def test_every_entry_config_composes(entry):
    cfg = compose(entry)
    obj = to_object(cfg)
    assert isinstance(obj, ENTRY_SCHEMAS[entry])


def test_every_experiment_composes():
    from spindiff.config import CONFIG_DIR

    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        entry = OmegaConf.load(path).get("_entry_", "train") if False else None
        ok = False
        for e in ENTRY_SCHEMAS:
            try:
                compose(e, [f"experiment={path.stem}"])
                ok = True
            except ConfigError:
                pass
        assert ok, f"experiment {path.stem} composes for no entry point"


def test_dotlist_override_applies():
    cfg = compose("sample", ["model.name=tiny-gpt2", "sampler.steps=7", "sampler.eta=0.5"])
    assert cfg.model.name == "tiny-gpt2" and cfg.sampler.steps == 7 and cfg.sampler.eta == 0.5


def test_misspelt_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        compose("sample", ["sampler.stpes=20"])
    msg = str(e.value)
    assert "sampler.stpes" in msg and "sampler.steps" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown config key 'modle.name'.*model.name"):
        compose("analysis", ["modle.name=gpt2"])


def test_wrong_type_is_clear():
    with pytest.raises(ConfigError, match=r"^sampler.steps='many' is not valid .*expected an integer; e.g. sampler.steps=10$"):
        compose("sample", ["sampler.steps=many"])


def test_not_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        compose("train", ["smollm2"])


def test_config_file_and_bad_experiment(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("sampler:\n  steps: 33\n")
    assert compose("sample", [f"config={f}"]).sampler.steps == 33
    f.write_text("sampler:\n  setps: 33\n")
    with pytest.raises(ConfigError, match="sampler.setps"):
        compose("sample", [f"config={f}"])
    with pytest.raises(ConfigError, match="no experiment"):
        compose("train", ["experiment=does-not-exist"])


def test_help_prints_tree(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli("sample", ["--help"], "usage: python sample.py [key=value ...]")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python sample.py" in out and "sampler:" in out and "steps:" in out


def test_cli_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli("train", ["optim.lrr=1"], "usage")
    assert e.value.code == 2
    assert "optim.lr" in capsys.readouterr().err


def test_help_text_mentions_all_sections():
    text = help_text("train", "usage")
    for section in ("model:", "sde:", "score_net:", "field:", "data:", "trainer:", "wandb:"):
        assert section in text


# ----------------------------------------------------------------------------- one config truth
import analysis  # noqa: E402,F401  (registers the analysis entry)
from spindiff.config import (CHOICES, ENTRIES, RANGES, EvaluateConfig, SampleConfig, TrainConfig,  # noqa: E402
                             register_user_error, USER_ERRORS)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix + k != "trainer":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("entry", sorted(ENTRY_SCHEMAS))
def test_shipped_yaml_equals_the_dataclass_defaults(entry):
    """What the CLI composes (dataclass + configs/*.yaml) is what a programmatic caller gets from
    the dataclass alone: a YAML value that differs from its default is a second truth."""
    plain = _flat(OmegaConf.to_container(OmegaConf.structured(ENTRY_SCHEMAS[entry])))
    cli = _flat(OmegaConf.to_container(compose(entry, check_values=False)))
    diff = {k: (plain.get(k), cli.get(k)) for k in sorted(set(plain) | set(cli)) if plain.get(k) != cli.get(k)}
    assert not diff, f"dataclass default != shipped YAML for {entry}: {diff}"


def test_programmatic_entries_compose_like_the_cli():
    from spindiff.evaluation.evaluate import as_eval_config
    from spindiff.generation.sample import as_config

    same = lambda a, b: OmegaConf.to_container(a) == OmegaConf.to_container(b)  # noqa: E731
    assert same(as_config(SampleConfig()), compose("sample", check_values=False))
    assert same(as_eval_config(EvaluateConfig()), compose("evaluate", check_values=False))
    assert same(as_eval_config(SampleConfig()), compose("evaluate", check_values=False))
    assert same(OmegaConf.structured(TrainConfig()), compose("train", check_values=False))  # train(TrainConfig())


def test_programmatic_entries_are_checked_before_any_load(tmp_path, monkeypatch):
    """train / sample / evaluate on a dataclass run the same checks as the CLI, before a model is
    loaded or a directory is created."""
    from spindiff.config import EvalConfig, SamplerConfig
    from spindiff.evaluation.evaluate import evaluate
    from spindiff.generation.sample import SampleError, sample
    from spindiff.training.train import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("spindiff.lm.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="trainer.max_steps=-5"):
        train(TrainConfig(trainer={"max_steps": -5}))
    with pytest.raises(SampleError, match="sampler.steps=0"):
        sample(SampleConfig(sampler=SamplerConfig(steps=0)))
    with pytest.raises(ConfigError, match="eval.n_draws=-1"):
        evaluate(EvaluateConfig(eval=EvalConfig(n_draws=-1)))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- checks at composition
@pytest.mark.parametrize("entry, override, match", [
    # anchored: the whole message, with a valid example (issue 22: never OmegaConf's bare
    # "Value 'abc' of type 'str' could not be converted to Integer")
    ("sample", "sampler.steps=abc", r"^sampler.steps='abc' .*an integer; e.g. sampler.steps=\d+$"),
    ("sample", "steer.words=", r"^steer.words= is empty .*steer.words=''.*e.g. steer.words=Paris,London$"),
    ("sample", "sampler.exit_kappa=abc", r"^sampler.exit_kappa='abc' .*a number; e.g. sampler.exit_kappa=\d+(\.\d+)?$"),
    ("sample", "stream=maybe", r"^stream='maybe' .*true or false; e.g. stream=true$"),
    ("sample", "wandb.tags=5", r"^wandb.tags=5 .*a list.*e.g. wandb.tags=\[a,b\]$"),
    ("train", "data.batch_size=0", r"^data.batch_size=0: must be >= 1 \(e.g. data.batch_size=256\)$"),
    ("train", "optim.scheduler=foo", r"^optim.scheduler='foo': choose one of cosine, constant \(e.g. optim.scheduler=cosine\)$"),
    ("train", "seed=-1", r"^seed=-1: must be an integer in \[0, 2\*\*32\) \(e.g. seed=0\)$"),
    ("train", "objective=nope", r"^objective='nope': choose one of .*euclid_ddpm.*\(e.g. objective=posterior\)$"),
    ("train", "trainer.log_every_n_steps=0", r"^trainer.log_every_n_steps=0: must be an integer >= 1 .*e.g. trainer.log_every_n_steps=10"),
    ("sample", "max_new_tokens=0", r"^max_new_tokens=0: must be >= 1 \(e.g. max_new_tokens=16\)$"),
    ("analysis", "top_k=0", r"^top_k=0: must be >= 1 \(e.g. top_k=10\)$"),
    ("analysis", "heads=L3X", r"^heads=L3X: cannot parse .*e.g. heads=L3H5"),
    # choice fields: the message names the key and the choices
    ("train", "optim.scheduler=cosin", r"optim.scheduler='cosin': choose one of cosine, constant \(did you mean optim.scheduler=cosine"),
    ("train", "weighting=nope", r"weighting='nope': choose one of"),
    ("train", "sde.schedule=nope", r"sde.schedule='nope': choose one of .*linear"),
    ("train", "score_net.features=both", r"score_net.features='both': choose one of none, field, hidden, field\+hidden"),
    ("train", "field.protocol=insitu", r"field.protocol='insitu': choose one of in_situ, paper, paper_fixed"),
    ("train", "model.dtype=float8", r"model.dtype='float8': choose one of float32, float64, bfloat16"),
    ("train", "model.device=tpu", r"model.device='tpu': use auto, cpu, cuda or cuda:N"),
    ("train", "data.source=web", r"data.source='web': choose one of lm, file"),
    ("sample", "sampler.name=nope", r"unknown sampler.name='nope'.*ar.*spin"),
    ("sample", "sampler.method=nope", r"sampler.method='nope': choose one of .*geodesic_em"),
    ("sample", "wandb.mode=sometimes", r"wandb.mode='sometimes': choose one of auto, offline, online, disabled"),
    # numeric keys: batch sizes, lr, val fraction, steps, n_draws, trainer values
    ("train", "data.gen_batch_size=-2", r"data.gen_batch_size=-2: must be >= 1"),
    ("train", "optim.lr=0", r"optim.lr=0.0: must be > 0"),
    ("train", "optim.lr=-1e-3", r"optim.lr=-0.001: must be > 0"),
    ("train", "data.val_fraction=1.5", r"data.val_fraction=1.5: must be in \[0, 1\)"),
    ("train", "data.seq_len=1", r"data.seq_len=1: must be >= 2"),
    ("train", "data.n_sequences=1", r"data.n_sequences=1: sample at least 2"),
    ("train", "data.source=file", r"data.source=file needs data.path=FILE"),
    ("train", "sde.beta_max=0.01", r"sde.beta_max=0.01 is below sde.beta_min=0.1"),
    ("train", "eval_t=[0.5,2.0]", r"eval_t=\[0.5, 2.0\]: every time must lie in \(0, sde.T=1.0\]"),
    ("train", "trainer.max_steps=-5", r"trainer.max_steps=-5: must be an integer >= 0 \(or -1 = no limit; e.g. trainer.max_steps=400\)"),
    ("train", "trainer.max_steps=-1", r"trains forever"),
    ("train", "trainer.max_steps=0", r"trainer.max_steps=0 trains nothing"),
    ("train", "trainer.val_check_interval=1.5", r"trainer.val_check_interval=1.5"),
    ("train", "trainer.precision=17", r"lightning.Trainer rejects trainer.precision=17: Precision '?17'? is invalid"),
    ("train", "trainer.devices=0", r"lightning.Trainer rejects .*trainer.devices=0"),
    ("train", "trainer.max_stepz=3", r"unknown trainer key 'trainer.max_stepz'.*Did you mean trainer.max_steps"),
    ("sample", "sampler.steps=0", r"sampler.steps=0.*at least 1"),
    ("sample", "sampler.batch_size=0", r"sampler.batch_size=0: must be >= 1"),
    ("sample", "prompts=/no/such/prompts.txt", r"prompts=/no/such/prompts.txt: no such file"),
    ("sample", "ckpt=/no/such/last.ckpt", r"no checkpoint at /no/such/last.ckpt"),
    ("evaluate", "eval.n_draws=-1", r"eval.n_draws=-1: must be >= 0"),
    ("evaluate", "eval.seeds=[]", r"eval.seeds=\[\]: must be a non-empty list"),
    ("evaluate", "eval.n_prompts=-3", r"eval.n_prompts=-3: must be >= 0"),
    ("evaluate", "eval.prompts=/no/such.txt", r"eval.prompts=/no/such.txt: no such file"),
])
def test_bad_values_fail_at_composition(entry, override, match):
    """Every bad value fails at composition (before anything is loaded), naming its key and the fix."""
    with pytest.raises(tuple(USER_ERRORS), match=match):
        compose(entry, ["model.name=tiny-gpt2", override])


def test_every_check_key_exists_in_some_entry():
    """CHOICES / RANGES name real keys (a renamed field must not leave a check that never runs)."""
    keys = set()
    for entry in ENTRIES:
        keys |= set(_flat(OmegaConf.to_container(OmegaConf.structured(ENTRIES[entry].schema))))
    assert not (set(CHOICES) | set(RANGES)) - keys


def test_unknown_key_lists_the_suggestion_and_its_section_only():
    with pytest.raises(ConfigError) as e:
        compose("sample", ["sampler.stpes=20"])
    msg = str(e.value)
    assert "Did you mean sampler.steps" in msg and "Keys of sampler: name," in msg and ", steps," in msg
    assert "model.name" not in msg and "wandb" not in msg and "steer" not in msg and len(msg) < 400
    with pytest.raises(ConfigError) as e:
        compose("train", ["scorenet.hidden=3"])  # a misspelt section: the suggestion's section
    assert "Did you mean score_net.hidden" in str(e.value) and "Keys of score_net:" in str(e.value)
    assert "optim" not in str(e.value)


def test_eval_keys_moved_to_the_evaluate_entry():
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.n_draws'.*python -m spindiff.evaluate"):
        compose("sample", ["eval.n_draws=8"])
    cfg = compose("evaluate", ["eval.n_draws=8", "sampler.steps=3"])
    assert cfg.eval.n_draws == 8 and cfg.sampler.steps == 3 and cfg.model.name == "auto"


def test_user_error_registry_and_run_cli(capsys):
    from spindiff.config import run_cli

    class Oops(ValueError):
        pass

    assert register_user_error(Oops) is Oops and Oops in USER_ERRORS

    def fail(cfg):
        raise Oops("bad input: use x=1")

    assert run_cli("sample", ["model.name=tiny-gpt2"], "usage", fail) == 2
    assert capsys.readouterr().err == "error: bad input: use x=1\n"
    with pytest.raises(KeyError):  # anything else is a bug: it keeps its traceback
        run_cli("sample", ["model.name=tiny-gpt2"], "usage", lambda cfg: {}["x"])
    USER_ERRORS.remove(Oops)
