"""The built-in model zoo: the shipped checkpoint, its card's figures, the split, the CLI, and an
end-to-end training run at CI size."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

import remoe_engine.zoo as zoo
from remoe_engine import cli
from remoe_engine.evaluation import perplexity, windows
from remoe_engine.zoo import data as zdata
from remoe_engine.zoo.evaluate import evaluate
from remoe_engine.zoo.train import balance_loss, render_card

transformers = pytest.importorskip("transformers")

# Small, self-contained standard library modules: real text for the CI-size training runs.
_TINY_CORPUS = ["textwrap", "bisect", "colorsys", "keyword", "heapq", "fnmatch", "glob", "shlex"]


@pytest.fixture(scope="module")
def tiny_dir() -> pathlib.Path:
    return zoo.path("tiny")


@pytest.fixture(scope="module")
def card(tiny_dir) -> dict:
    return json.loads((tiny_dir / "card.json").read_text())


@pytest.fixture(scope="module")
def model(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def slice_eval(tiny_dir, model, card):
    """One pass over the shipped held-out slice: (perplexity dict, RoutingStats)."""
    wins = load_file(str(tiny_dir / card["eval"]["slice_file"]))["input_ids"].long()
    return evaluate(model, wins, block=card["eval"]["routing_slice"]["distinct_block"])


# ---------------------------------------------------------------------------- access


def test_path_gives_the_shipped_checkpoint(tiny_dir):
    assert "tiny" in zoo.available()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md",
                 "card.json", "loss_curve.png", "heldout_slice.safetensors"):
        assert (tiny_dir / name).is_file(), name


def test_path_unknown_name_lists_available():
    with pytest.raises(zoo.ZooError, match=r"unknown built-in model 'nope'; available: .*tiny"):
        zoo.path("nope")


def test_cli_path(capsys):
    assert cli.main(["zoo", "path"]) == 0
    assert pathlib.Path(capsys.readouterr().out.strip()) == zoo.path("tiny")
    assert cli.main(["zoo", "path", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("remoe zoo: error: unknown built-in model 'nope'")
    assert "\n" not in err


def test_shipped_size_within_budget(tiny_dir):
    total = sum(p.stat().st_size for p in tiny_dir.iterdir() if p.is_file())
    assert total <= 20 * 2**20


# ---------------------------------------------------------------------------- shipped model


def test_shipped_model_is_the_card_architecture(model, card):
    a = card["architecture"]
    c = model.config
    assert c.model_type == a["model_type"] == "qwen3_moe"
    assert (c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, c.hidden_size) == (
        a["layers"], a["experts"], a["top_k"], a["hidden"])
    assert c.norm_topk_prob is a["norm_topk_prob"]
    assert sum(p.numel() for p in model.parameters()) == a["parameters"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_shipped_model_generates_the_card_sample(tiny_dir, model, card):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    prompt = card["sample"]["prompt"]
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=False)
    # Greedy decoding of the stored weights starts the card's sample (16 of its tokens keep the
    # check clear of near-ties that another CPU's float rounding could flip).
    assert len(text) > len(prompt) + 16
    assert card["sample"]["text"].startswith(text)


def test_heldout_slice_perplexity_matches_card(slice_eval, card):
    stated = card["eval"]["perplexity_slice"]
    ppl = slice_eval[0]
    assert ppl["predicted_tokens"] == stated["predicted_tokens"]
    assert ppl["perplexity"] == pytest.approx(stated["perplexity"], rel=0.01)
    # A trained model, not a lucky one: far below the uniform-guess perplexity of its vocabulary.
    assert ppl["perplexity"] < card["architecture"]["vocab"] / 100


def test_routing_is_not_degenerate(slice_eval, card):
    stats = slice_eval[1]
    stated = card["eval"]["routing_slice"]
    assert stats.unused_experts == []  # every expert of every layer is used on held-out text
    assert stats.share_max <= card["eval"]["max_share_bound"]
    assert stats.share_min > 0
    # The routing figures on the card are the ones the stored weights produce.
    assert stats.eor == pytest.approx(stated["eor"], abs=0.005)
    assert stats.distinct_mean == pytest.approx(stated["distinct_mean"], abs=0.05)
    assert stats.share_max == pytest.approx(stated["share_max"], abs=0.002)
    # Trained routing keeps experts across neighbouring tokens more than chance does.
    assert stats.eor > stats.eor_random
    assert stats.distinct_mean < stats.distinct_random


def test_model_card_text_states_card_json(tiny_dir, card):
    text = (tiny_dir / "MODEL_CARD.md").read_text()
    # The pretraining part is rendered from card.json; the sections after it are generated from
    # their own result files (bench/experiments/learned_bias.py, then finetune_sweep.py).
    markers = [m for m in ("\n\n<!-- learned-bias:begin", "\n\n<!-- remoe-finetune:begin")
               if m in text]
    pretraining = (text[: min(text.index(m) for m in markers)] + "\n" if markers else text)
    assert pretraining == render_card(card)
    full = card["eval"]["perplexity_held_out"]
    assert f"{full['perplexity']:.4f}" in (tiny_dir / "MODEL_CARD.md").read_text()
    assert card["command"].startswith("remoe zoo train --out ")


def test_card_held_out_files_follow_the_split_rule(card):
    d = card["data"]
    if d["source"] != "python-stdlib":
        pytest.skip("card made from a custom folder")
    names = d["held_out_names"]
    assert names == sorted(names)
    assert all(zdata.is_held_out(n, d["held_out_fraction"], d["split_seed"]) for n in names)
    # Files of this Python's stdlib that the card's Python also had are split identically.
    local = {f.name for f in zdata.discover()}
    _, held = zdata.split(zdata.discover(), d["held_out_fraction"], d["split_seed"])
    assert {f.name for f in held} & set(names) == local & set(names)


# ---------------------------------------------------------------------------- data


def _write_corpus(folder: pathlib.Path, names=_TINY_CORPUS) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(zdata.stdlib_dir() / f"{name}.py", folder / f"{name}.py")
    return folder


def test_split_depends_only_on_file_name_and_seed(tmp_path):
    files = [zdata.TextFile(f"pkg/mod{i}.py", tmp_path / f"{i}") for i in range(400)]
    train, held = zdata.split(files, 0.1, seed=3)
    assert 20 < len(held) < 60 and len(train) + len(held) == 400
    # Dropping other files never moves a file across the split.
    _, held_half = zdata.split(files[::2], 0.1, seed=3)
    assert {f.name for f in held_half} == {f.name for f in held} & {f.name for f in files[::2]}
    _, held_other_seed = zdata.split(files, 0.1, seed=4)
    assert {f.name for f in held_other_seed} != {f.name for f in held}


def test_discover_stdlib_skips_tests_and_site_packages():
    names = [f.name for f in zdata.discover()]
    assert "textwrap.py" in names and names == sorted(names)
    assert not any(part in zdata.STDLIB_SKIP_DIRS for n in names for part in n.split("/")[:-1])


def test_discover_rejects_folder_without_text(tmp_path):
    (tmp_path / "image.bin").write_bytes(b"\0\1")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(zoo.ZooError, match="no non-empty text files"):
        zdata.discover(tmp_path)
    with pytest.raises(zoo.ZooError, match="does not exist"):
        zdata.discover(tmp_path / "missing")


def test_split_needs_two_files(tmp_path):
    one = [zdata.TextFile("a.txt", tmp_path / "a.txt")]
    with pytest.raises(zoo.ZooError, match="need at least 2 text files"):
        zdata.split(one)


def test_windows_drop_the_partial_tail():
    wins = windows(torch.arange(10, dtype=torch.int32), 4)
    assert wins.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and wins.dtype == torch.int64
    with pytest.raises(ValueError, match="need at least 4 tokens"):
        windows(torch.arange(3), 4)


# ---------------------------------------------------------------------------- balance loss


def test_balance_loss_is_top_k_when_balanced_and_grows_when_collapsed():
    gen = torch.Generator().manual_seed(0)
    balanced = torch.randn(20000, 8, generator=gen)  # [T, E]
    assert float(balance_loss((balanced,), top_k=2)) == pytest.approx(2.0, rel=0.03)
    collapsed = torch.full((64, 8), -10.0)
    collapsed[:, :2] = 10.0  # every token sends all its weight to experts 0 and 1
    assert float(balance_loss((collapsed,), top_k=2)) == pytest.approx(8.0, rel=1e-3)


def test_balance_loss_sees_a_layer_that_transformers_pooled_loss_misses():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    # Layer 0 uses experts 0-3 only, layer 1 experts 4-7 only: each layer leaves half idle.
    first = torch.full((64, 8), -10.0)
    first[:, :4] = 10.0
    second = first.roll(4, dims=1)
    pooled = float(load_balancing_loss_func((first, second), num_experts=8, top_k=4))
    per_layer = float(balance_loss((first, second), top_k=4))
    assert pooled == pytest.approx(4.0, rel=1e-3)  # looks perfectly balanced
    assert per_layer == pytest.approx(8.0, rel=1e-3)  # twice the balanced value


# ---------------------------------------------------------------------------- CLI and training


def test_train_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code = cli.main(["zoo", "train", "--tiny", "--data", str(tmp_path / "data"),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("remoe zoo: error: no non-empty text files")
    corpus = _write_corpus(tmp_path / "corpus", _TINY_CORPUS[:2])
    code = cli.main(["zoo", "train", "--tiny", "--experts", "2", "--top-k", "3", "--data",
                     str(corpus), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--top-k 3 exceeds --experts 2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CI-size run of `remoe zoo train --tiny` on a few real stdlib modules."""
    root = tmp_path_factory.mktemp("zoo_train")
    corpus = _write_corpus(root / "corpus")
    out = root / "out"
    argv = ["zoo", "train", "--tiny", "--data", str(corpus), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    return corpus, out, argv


@pytest.mark.slow
def test_tiny_training_run_writes_a_loadable_checkpoint(tiny_run):
    _, out, _ = tiny_run
    card = json.loads((out / "card.json").read_text())
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "MODEL_CARD.md").read_text() == render_card(card)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless round trip
    assert model.config.num_experts == 8 and model.config.output_router_logits is False
    # The card's slice perplexity is the stored weights' perplexity on the stored slice.
    wins = load_file(str(out / "heldout_slice.safetensors"))["input_ids"].long()
    ppl = perplexity(model, wins)["perplexity"]
    assert ppl == pytest.approx(card["eval"]["perplexity_slice"]["perplexity"], rel=0.01)
    # 30 steps already beat guessing uniformly over the 512-token vocabulary.
    assert ppl < 512
    assert card["training"]["steps"] == 30 and card["data"]["held_out_files"] >= 1


@pytest.mark.slow
def test_tiny_training_run_is_deterministic(tiny_run, tmp_path):
    corpus, out, argv = tiny_run
    again = tmp_path / "again"
    assert cli.main([*argv[:-2], str(again), "--no-progress"]) == 0
    first = load_file(str(out / "model.safetensors"))
    second = load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert (out / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
