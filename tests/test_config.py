"""Config system: every entry config composes, overrides apply, misspelt keys fail naming the key."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from spindiff.config import ENTRY_SCHEMAS, ConfigError, compose, help_text, parse_cli, to_object


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
    with pytest.raises(ConfigError, match="invalid value"):
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
