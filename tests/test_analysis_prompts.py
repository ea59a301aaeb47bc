"""Prompt sets: bundled data, user files in three formats with line-numbered errors, and the
tokenisation checks (multi-token candidates, shared first tokens, context window)."""
from __future__ import annotations

import json

import pytest

from analysis.prompts import PromptFileError, PromptTokenError, from_triples, load_prompts, tokenize_set
from spindiff.lm.tokens import pad_left


def test_bundled_sets():
    paper = load_prompts("paper")
    assert len(paper) == 20
    assert paper.items[13].prompt == "Lions are carnivores. Cows are"
    assert (paper.items[13].good, paper.items[13].bad) == ("herbivores", "omnivores")
    # the paper's table vs the reference code's variant of row 16
    assert paper.items[16].good == "twenty-four"
    assert load_prompts("paper", variant="reference").items[16].good == "twenty"
    ext, held = load_prompts("extended"), load_prompts("heldout")
    assert len(ext) >= 200 and len(held) >= 60
    ext_p, held_p, pap_p = set(ext.prompts), set(held.prompts), set(paper.prompts)
    assert len(ext_p) == len(ext) and len(held_p) == len(held)  # no duplicates
    assert not ext_p & held_p and not ext_p & pap_p and not held_p & pap_p  # disjoint
    assert all(it.good != it.bad for it in ext.items + held.items)
    assert len({it.category for it in ext.items}) >= 10


def test_user_files_three_formats(tmp_path):
    rows = [{"prompt": "A dog says woof. A cat says", "good": "meow", "bad": "moo"},
            {"prompt": "The opposite of up is", "good": "down", "bad": "left"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"prompts": rows}, indent=2))
    (tmp_path / "c.csv").write_text('prompt,good,bad\n"A dog says woof. A cat says",meow,moo\n'
                                    "The opposite of up is,down,left\n")
    for name in ("a.jsonl", "b.json", "c.csv"):
        ps = load_prompts(str(tmp_path / name))
        assert ps.prompts == [r["prompt"] for r in rows] and ps.goods == ["meow", "down"]


@pytest.mark.parametrize("name,text,match", [
    ("bad.jsonl", '{"prompt": "a", "good": "b", "bad": "c"}\n{"prompt": "x", "good": "y"\n', "line 2: not valid JSON"),
    ("miss.jsonl", '{"prompt": "a", "good": "b", "bad": "c"}\n\n{"prompt": "x", "good": "y"}\n',
     "line 3: missing field"),
    ("empty.jsonl", '{"prompt": "   ", "good": "b", "bad": "c"}\n', "line 1: empty prompt"),
    ("same.jsonl", '{"prompt": "p", "good": "b", "bad": "b"}\n', "line 1: good and bad are the same"),
    ("arr.json", '[\n {"prompt": "a", "good": "b", "bad": "c"},\n {"prompt": "a", "good": 3, "bad": "c"}\n]',
     "line 3: field 'good' must be a string"),
    ("broken.json", '[\n {"prompt": "a",\n  "good" "b"}\n]', "line 3: not valid JSON"),
    ("nohead.csv", "a,b,c\nx,y,z\n", "line 1: CSV header lacks prompt, good, bad"),
    ("row.csv", "prompt,good,bad\nx,y,z\n,y,z\n", "line 3: empty prompt"),
    ("extra.csv", "prompt,good,bad\nx, y,z\nHi, there,y,z\n", "line 3: more fields"),
    ("p.txt", "x", "unknown prompt-file type"),
])
def test_malformed_files_name_the_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptFileError, match=match):
        load_prompts(str(tmp_path / name))


def test_missing_file():
    with pytest.raises(PromptFileError, match="neither a bundled set"):
        load_prompts("no/such/file.jsonl")


def test_tokenize_flags_multi_token_and_shared_first(tiny_gpt2, capsys):
    _, tok = tiny_gpt2
    ps = from_triples([("The capital of France is Paris. The capital of Germany is", "Berlin", "Rome"),
                       ("Lions are carnivores. Cows are", "herbivores", "omnivores"),
                       ("Count:", "Twelve", "Twenty")], name="flags")
    ts = tokenize_set(tok, ps, 128)
    err = capsys.readouterr().err  # warning lines on stderr (spindiff.runtime.notice)
    assert "warning: " in err and "of 'flags' are several tokens" in err
    words = {m["word"] for m in ts.multi_token}
    assert "herbivores" in words and "Berlin" not in words
    for m in ts.multi_token:  # the first token of ' ' + word is what gets scored
        assert getattr(ts, f"{m['which']}_first")[m["prompt_id"]] == tok.convert_tokens_to_ids(m["tokens"][0])
    assert ("share their first token" in err) == bool(ts.shared_first)
    for i in ts.shared_first:
        assert ts.good_first[i] == ts.bad_first[i]


def test_prompt_longer_than_context(tiny_gpt2):
    _, tok = tiny_gpt2
    ps = from_triples([("The capital of France is Paris. " * 40, "Berlin", "Rome")])
    with pytest.raises(PromptTokenError, match="context window of 128"):
        tokenize_set(tok, ps, 128)


def test_empty_prompt_inline():
    with pytest.raises(PromptFileError, match="empty prompt"):
        from_triples([("", "a", "b")])


def test_pad_left():
    ids, mask = pad_left([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.smollm2
@pytest.mark.slow
def test_extended_sets_single_token_on_smollm2(smollm2, capsys):
    """Every candidate of the extended and held-out sets is one SmolLM2 token, and no pair shares it."""
    for name in ("extended", "heldout"):
        ts = tokenize_set(smollm2.tokenizer, load_prompts(name), 8192)
        assert ts.multi_token == [] and ts.shared_first == []
    assert "warning:" not in capsys.readouterr().err  # no multi-token / shared-first warning
    paper = tokenize_set(smollm2.tokenizer, load_prompts("paper"), 8192, warn=False)
    assert {m["word"] for m in paper.multi_token} >= {"meow", "moo", "screwdriver", "NaCl", "omnivores"}
