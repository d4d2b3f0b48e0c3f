"""Router-only ReMoE fine-tuning end to end at a tiny size: outputs, resume, determinism, DDP."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hf_tiny import VARIANTS, build, variant_id
from safetensors import safe_open

from remoe_engine.cli import main as cli_main
from remoe_engine.finetune import delta as fdelta
from remoe_engine.finetune.config import ReMoEConfig
from remoe_engine.finetune.train import (
    freeze_all_but_routers,
    load_checkpoint,
    remoe_loss,
    router_tap,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _package_env() -> dict[str, str]:
    """The environment of a `python -m remoe_engine` subprocess (run in a temporary folder, not
    the repository root, whose source tree without a built _C would shadow the installed
    package): PYTHONPATH is the folder of the remoe_engine this process imported."""
    import remoe_engine

    return {**os.environ,
            "PYTHONPATH": os.path.dirname(os.path.dirname(remoe_engine.__file__))}
VOCAB = 320
WORDS = ("def class return import self if else for in while with as try except yield lambda "
         "None True False print len range").split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    """A tiny random Qwen3-MoE checkpoint with a byte-level BPE tokenizer, and training text."""
    from remoe_engine.zoo.train import train_tokenizer

    root = tmp_path_factory.mktemp("ft")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g))
             for _ in range(1500)]
    text = "\n".join(lines)
    (root / "train.txt").write_text(text)
    model = build("qwen3_moe", vocab_size=VOCAB)
    model.save_pretrained(root / "base")
    train_tokenizer([text], VOCAB).save_pretrained(root / "base")
    return root


def tiny_cfg(**kw) -> ReMoEConfig:
    args = dict(steps=12, batch=2, seq_len=32, lr=1e-2, save_every=4, lags=(1, 2, 4), window=8)
    args.update(kw)
    return ReMoEConfig(**args)


def run_finetune(base: pathlib.Path, out: pathlib.Path, cfg: ReMoEConfig, **kw) -> dict:
    from transformers import AutoTokenizer

    from remoe_engine.finetune.data import encode, read_texts
    from remoe_engine.finetune.train import finetune

    tok = AutoTokenizer.from_pretrained(base / "base")
    stream = encode(tok, read_texts(base / "train.txt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons need one reduction order
    try:
        return finetune(base / "base", out, stream, cfg, progress=False, log=lambda s: None, **kw)
    finally:
        torch.set_num_threads(threads)


def delta_tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    return fdelta.read_router_delta(folder)[0]


def eor_on(model_dir: pathlib.Path, base: pathlib.Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remoe_engine.evaluation import windows
    from remoe_engine.finetune.data import encode, read_texts
    from remoe_engine.zoo.evaluate import routing_stats

    tok = AutoTokenizer.from_pretrained(base / "base")
    wins = windows(encode(tok, read_texts(base / "train.txt")), 64, 64 * 16)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return routing_stats(model, wins, block=16).eor


@pytest.mark.slow
def test_end_to_end_only_routers_change_and_reuse_rises(base, tmp_path):
    out = tmp_path / "out"
    summary = run_finetune(base, out, tiny_cfg(lambda_kl=0.1))
    router_keys = [f"model.layers.{i}.mlp.gate.weight" for i in range(4)]
    # Only router tensors differ between input and output checkpoints, and all of them do.
    assert fdelta.changed_tensors(base / "base", out) == router_keys
    assert summary["changed_tensors"] == router_keys
    # The delta holds exactly the routers, equal to the output checkpoint's.
    delta = delta_tensors(out)
    assert sorted(delta) == router_keys
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for k in router_keys:
            assert torch.equal(f.get_tensor(k), delta[k])
    # Applying the delta to the original model gives the fine-tuned model's logits.
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    tuned = AutoModelForCausalLM.from_pretrained(out).eval()
    applied = fdelta.apply_router_delta(AutoModelForCausalLM.from_pretrained(base / "base"),
                                        out / fdelta.DELTA_NAME).eval()
    with torch.no_grad():
        assert torch.equal(tuned(ids).logits, applied(ids).logits)
    # The tokenizer travels with the checkpoint, and the loss did its job: more reuse.
    assert (out / "tokenizer.json").is_file()
    assert eor_on(out, base) > eor_on(base / "base", base) + 0.05


def test_deterministic_for_a_seed(base, tmp_path):
    cfg = tiny_cfg(steps=4, save_every=0)
    run_finetune(base, tmp_path / "a", cfg)
    run_finetune(base, tmp_path / "b", cfg)
    run_finetune(base, tmp_path / "c", tiny_cfg(steps=4, save_every=0, seed=1))
    a, b, c = (delta_tensors(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(base, tmp_path):
    steps, save_every = 120, 5
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "remoe_engine", "finetune", "--model", str(base / "base"),
           "--out", str(out), "--data", str(base / "train.txt"), "--steps", str(steps),
           "--batch", "2", "--seq-len", "32", "--lr", "0.01", "--save-every", str(save_every),
           "--lags", "1,2,4", "--window", "8", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_package_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt = out / "remoe-state" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    try:
        while not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash
    finally:
        proc.kill()
        proc.wait()
    state = load_checkpoint(out)  # the file under the final name is always complete
    assert 0 < state["step"] < steps and state["step"] % save_every == 0
    assert not (out / "model.safetensors").exists()  # no output before the run ends

    # Resume in-process with the same config (another config is refused, see below) to the end.
    cfg = tiny_cfg(steps=steps, save_every=save_every)
    resumed = run_finetune(base, out, cfg)
    assert resumed["steps_run_now"] == steps - state["step"]
    reference = tmp_path / "reference"
    run_finetune(base, reference, cfg)
    a, b = delta_tensors(out), delta_tensors(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_config(base, tmp_path):
    from remoe_engine.finetune.train import FinetuneError

    out = tmp_path / "o"
    run_finetune(base, out, tiny_cfg(steps=2), write_output=False)
    with pytest.raises(FinetuneError, match="another config"):
        run_finetune(base, out, tiny_cfg(steps=2, lambda_reuse=3.0))


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_only_routers_train_in_every_family(variant):
    model_type, extra = variant
    model = build(model_type, **extra)
    routers = freeze_all_but_routers(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = ReMoEConfig(lags=(1, 2), window=4)
    with router_tap(model, cfg) as tap:
        loss, logged = remoe_loss(model, tap, ids, cfg, step=1)
    loss.backward()
    assert torch.isfinite(loss)
    opt = torch.optim.AdamW(routers.values(), lr=1e-2)
    opt.step()
    for name, p in model.named_parameters():
        if name in routers:
            assert p.grad is not None and not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


def test_custom_terms_fn_sees_each_layer_once_and_drives_the_loss():
    from remoe_engine.finetune.loss import layer_terms

    model = build("qwen3_moe")
    freeze_all_but_routers(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = ReMoEConfig(lags=(1, 2), window=4)
    seen = []

    def terms_fn(logits, top_ids, ref, cfg, layer):
        seen.append(layer)
        terms = layer_terms(logits, top_ids, ref, cfg)
        terms["reuse"] = terms["reuse"] * 0.0  # a variant that drops the reuse term
        return terms

    with router_tap(model, cfg) as tap:
        _, logged = remoe_loss(model, tap, ids, cfg, step=1, terms_fn=terms_fn)
        _, default = remoe_loss(model, tap, ids, cfg, step=1)
    assert seen == list(range(len(tap.blocks)))
    assert logged["reuse"] == 0.0
    assert default["reuse"] > 0.0 and default["ce"] == pytest.approx(logged["ce"])


def test_model_card_section_is_generated_from_the_committed_results():
    """The card's ReMoE tables come from bench/results, never typed: regenerate and compare."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "finetune_sweep", REPO / "bench" / "experiments" / "finetune_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    CARD_BEGIN, card_section = sweep.CARD_BEGIN, sweep.card_section

    results = REPO / "bench" / "results"
    load = lambda name: json.loads((results / name).read_text())  # noqa: E731
    sweep_doc = load("finetune-sweep.json")
    section = card_section(sweep_doc, sweep_doc["chosen"], sweep_doc, load("finetune-compare.json"),
                           (REPO / "docs" / "finetune-verdict.md").read_text(),
                           load("finetune-eval-full-heldout.json"), load("finetune-frontier.json"))
    card = (REPO / "remoe_engine" / "zoo" / "tiny" / "MODEL_CARD.md").read_text()
    assert card[card.index(CARD_BEGIN):] == section, (
        "MODEL_CARD.md is stale: rerun `python bench/experiments/finetune_sweep.py card ...`")


def test_apply_router_delta_rejects_another_model(base, tmp_path):
    model = build("qwen3_moe", vocab_size=VOCAB)
    path = fdelta.save_router_delta(model, tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="model type"):
        fdelta.apply_router_delta(build("olmoe"), path)
    with pytest.raises(ValueError, match="shape"):
        fdelta.apply_router_delta(build("qwen3_moe", num_experts=4), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fdelta.apply_router_delta(model, tmp_path / "missing.safetensors")


def test_cli_errors_are_one_line(base, tmp_path, capsys):
    common = ["finetune", "--model", str(base / "base"), "--out", str(tmp_path / "o"),
              "--steps", "2", "--no-progress"]
    assert cli_main(common + ["--data", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    assert cli_main(common + ["--data", str(tmp_path / "empty.txt")]) == 2
    err = capsys.readouterr().err
    assert "holds no text" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["eval", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("source,ce_gradient", [("previous", "straight-through"),
                                               ("resident", "spsa")])
def test_cli_learn_bias_writes_a_delta_with_strengths_and_the_routers_unchanged(
        base, tmp_path, source, ce_gradient):
    out = tmp_path / "lb"
    assert cli_main(["finetune", "--model", str(base / "base"), "--out", str(out),
                     "--data", str(base / "train.txt"), "--learn-bias", source,
                     "--bias-slots", "4", "--bias-steps", "2", "--batch", "2", "--seq-len", "16",
                     "--bias-per-expert", "--bias-ce-gradient", ce_gradient,
                     "--no-progress"]) == 0
    learned = fdelta.read_learned_bias(out / fdelta.DELTA_NAME)
    assert learned.source == source and learned.per_expert
    assert learned.slots == (4 if source == "resident" else None)
    assert bool((learned.strengths >= 0).all())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base / "base")
    tensors = delta_tensors(out)
    assert set(tensors) == set(fdelta.router_parameters(model)) | {fdelta.STRENGTHS_NAME}
    for name, p in fdelta.router_parameters(model).items():
        assert torch.equal(tensors[name], p.detach())
    summary = __import__("json").loads((out / "remoe-finetune.json").read_text())
    assert len(summary["history"]) == 2 and summary["config"]["source"] == source


def test_jsonl_data(base, tmp_path):
    from remoe_engine.finetune.data import DataError, read_texts

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b"}\n\n{"content": "c"}\n')
    assert read_texts(path) == ["a b", "c"]
    path.write_text('{"title": "x"}\n')
    with pytest.raises(DataError, match="no string field"):
        read_texts(path)


def test_saved_datasets_data(base, tmp_path):
    datasets = pytest.importorskip("datasets")  # in the test extra; optional for users
    from remoe_engine.finetune.data import DataError, read_texts

    rows = {"text": ["def f(x):", "return x"], "id": [1, 2]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "one")
    assert read_texts(tmp_path / "one") == rows["text"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({"text": ["x"], "id": [0]})}
                         ).save_to_disk(tmp_path / "dict")
    assert read_texts(tmp_path / "dict") == rows["text"]  # the train split
    with pytest.raises(DataError, match="no text column"):
        read_texts(tmp_path / "one", text_key="body")
    # The whole path: `remoe finetune --data` on a saved dataset trains and writes a delta.
    big = {"text": (base / "train.txt").read_text().split("\n")}
    datasets.Dataset.from_dict(big).save_to_disk(tmp_path / "big")
    out = tmp_path / "ft"
    assert cli_main(["finetune", "--model", str(base / "base"), "--data", str(tmp_path / "big"),
                     "--out", str(out), "--steps", "2", "--batch", "2", "--seq-len", "16",
                     "--no-progress"]) == 0
    assert (out / "router-delta.safetensors").is_file()


@pytest.mark.slow
def test_eval_command_writes_table_json_and_plot(base, tmp_path, capsys):
    out = tmp_path / "ft"
    run_finetune(base, out, tiny_cfg(steps=4))
    report = tmp_path / "report"
    rc = cli_main(["eval", "--model", str(base / "base"), "--finetuned", str(out), "--data",
                   str(base / "train.txt"), "--seq-len", "32", "--max-tokens", "512",
                   "--reuse-bias", "0.05", "--bias-source", "previous", "--decode-tokens", "64",
                   "--out", str(report), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fine-tuned router" in text and "original + bias 0.05 previous" in text
    import json

    doc = json.loads((report / "report.json").read_text())
    tf = doc["teacher_forced"]
    assert tf["fine-tuned router"]["topk_agreement"] < 1.0
    assert set(tf["original"]["hit_rates"]) == {"lru", "lfu", "opt"}
    # Decode loop without a bias routes exactly as the teacher-forced pass: agreement 1, KL 0.
    dec = doc["decode"]["original (decode)"]
    assert dec["topk_agreement"] == 1.0 and dec["kl"] == pytest.approx(0.0, abs=1e-6)
    assert doc["decode"]["original + bias 0.05 previous"]["eor"] > dec["eor"]
    assert (report / "report.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not pathlib.Path(
    sys.executable).with_name("accelerate").exists(), reason="accelerate launcher not installed")
def test_accelerate_launch_two_cpu_processes(base, tmp_path):
    launcher = shutil.which("accelerate") or str(pathlib.Path(sys.executable).with_name(
        "accelerate"))
    out = tmp_path / "ddp"
    # --multi_gpu runs torchrun; without a GPU accelerate falls back to CPU processes on gloo.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "remoe_engine", "finetune", "--model", str(base / "base"), "--out", str(out),
           "--data", str(base / "train.txt"), "--steps", "3", "--batch", "2", "--seq-len", "32",
           "--threads", "1", "--no-progress"]
    env = {**_package_env(), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    summary = json.loads((out / "remoe-finetune.json").read_text())
    assert summary["processes"] == 2 and summary["backend"] == "gloo"
    assert fdelta.changed_tensors(base / "base", out) == summary["changed_tensors"]
    assert len(summary["changed_tensors"]) == 4
