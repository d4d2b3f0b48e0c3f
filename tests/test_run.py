"""`remoe run` end to end on the built-in model, small settings; its JSON checked field by field."""

from __future__ import annotations

import json

import pytest

from remoe_engine import cli, zoo

ROW_FIELDS = {"name", "router", "reuse_bias", "bias_source", "tokens_per_s", "tpot_ms",
              "tpot_p90_ms", "floor_ms", "hit_rate", "bytes_read_per_token", "misses_per_token",
              "perplexity", "eor", "topk_agreement", "text", "lru_hit_rates", "stats"}

pytestmark = pytest.mark.slow  # each test runs remoe or a subprocess


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["run", "--json", "--max-new-tokens", "5", "--eval-tokens", "24"])
    assert status == 0
    return json.loads(out.getvalue())


def test_report_fields(report):
    model = zoo.path("tiny")
    assert report["model"] == str(model)
    assert report["layers"] > 0 and report["experts"] > report["top_k"] > 0
    # The default budget holds about a quarter of the experts.
    assert report["memory_budget"] == report["expert_bytes"] // 4
    assert report["read_bandwidth_gbps"] > 0 and report["compute_floor_ms"] > 0
    assert report["eval_tokens"] == 24 and report["max_new_tokens"] == 5
    names = [row["name"] for row in report["rows"]]
    # The built-in model ships a ReMoE router delta, a recommended bias (its card) and a learned
    # reuse bias (reuse-bias-delta.safetensors).
    assert names == ["original", "remoe", "original+bias", "remoe+bias", "learned"]
    assert report["router_delta"].endswith("router-delta.safetensors")
    for row in report["rows"]:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["tokens_per_s"] > 0 and row["tpot_ms"] > 0
        assert row["floor_ms"] >= report["compute_floor_ms"]
        assert 0.0 <= row["hit_rate"] <= 1.0
        assert row["bytes_read_per_token"] >= 0 and row["misses_per_token"] >= 0
        # Misses are what was read: one slot's worth of bytes each.
        assert row["bytes_read_per_token"] == pytest.approx(
            row["misses_per_token"] * report["slot_bytes"])
        assert row["perplexity"] > 1.0
        assert 0.0 <= row["eor"] <= 1.0 and 0.0 <= row["topk_agreement"] <= 1.0
        assert isinstance(row["text"], str)
        assert set(row["lru_hit_rates"]) == {"K", "2K", "budget"}
        assert all(0.0 <= v <= 1.0 for v in row["lru_hit_rates"].values())
    assert report["rows"][0]["topk_agreement"] == 1.0
    card = json.loads((zoo.path("tiny") / "card.json").read_text())["remoe"]
    for row in report["rows"][2:4]:
        assert row["reuse_bias"] == card["recommended_reuse_bias"]
        assert row["bias_source"] == card["recommended_bias_source"]
    assert [row["router"] for row in report["rows"]] == ["original", "remoe"] * 2 + ["learned"]
    assert report["rows"][4]["bias_source"] == "resident" and report["rows"][4]["reuse_bias"] > 0
    assert report["prefetch"] is False and all(r["stats"]["prefetches"] == 0
                                               for r in report["rows"])


def test_prefetch_option_reads_guesses_too(capsys):
    assert cli.main(["run", "--json", "--max-new-tokens", "3", "--eval-tokens", "24",
                     "--prefetch", "--router-delta", "none", "--learned-delta", "none",
                     "--reuse-bias", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefetch"] is True
    (row,) = report["rows"]
    decoded = report["eval_tokens"] - 1
    assert row["stats"]["prefetches"] > 0
    # Bytes read per decoded token = (misses + prefetched loads) x one slot.
    assert row["bytes_read_per_token"] == pytest.approx(
        (row["stats"]["misses"] + row["stats"]["prefetches"]) * report["slot_bytes"] / decoded)


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/ckpt"], "not a directory"),
    (["--memory-budget", "lots"], "cannot parse a byte size"),
    (["--router-delta", "/nonexistent/delta.safetensors"], "no such file"),
    (["--max-new-tokens", "1"], "must be >= 2"),
])
def test_bad_options_give_one_line(argv, message, capsys):
    assert cli.main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_budget_below_one_tokens_experts_fails_before_loading(capsys):
    import time

    start = time.perf_counter()
    assert cli.main(["run", "--memory-budget", "1KiB", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "one token needs" in err and "give at least" in err and len(err.splitlines()) == 1
    # Refused from the file headers, before any model is loaded (a load takes far longer).
    assert time.perf_counter() - start < 30


def test_a_folder_without_a_tokenizer_says_so_in_full(tmp_path, capsys):
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(zoo.path("tiny") / name, tmp_path / name)
    assert cli.main(["run", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tokenizer" in err and "save_pretrained" in err and len(err.splitlines()) == 1


def test_the_table_says_what_each_row_and_column_means():
    from remoe_engine.compare import format_table

    row = dict(name="remoe+bias", reuse_bias=0.02, bias_source="previous", tokens_per_s=10.0,
               tpot_ms=100.0, floor_ms=50.0, hit_rate=0.5, bytes_read_per_token=2048.0,
               perplexity=17.0, eor=0.3, topk_agreement=0.8)
    table = format_table({"rows": [row]})
    assert "0.02" in table.splitlines()[2]  # the bias value is in the row
    for term in ("router delta shipped with the model", "previous token's", "hit rate",
                 "EOR", "top-k agr", "same interleaved run"):
        assert term in table, term


def test_quantize_adds_one_row_per_scheme(capsys):
    assert cli.main(["run", "--json", "--max-new-tokens", "3", "--eval-tokens", "24",
                     "--router-delta", "none", "--learned-delta", "none", "--reuse-bias", "0",
                     "--quantize", "int8,int4:g32"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in report["rows"]]
    assert names == ["original", "original@int8", "original@int4:g32"]
    full, int8, int4 = report["rows"]
    assert full["quantize"] is None and int8["quantize"] == "int8"
    # A miss reads one compressed blob: int8 about a quarter of the fp32 slot, int4 an eighth.
    assert full["blob_bytes"] == report["slot_bytes"]
    assert int8["blob_bytes"] <= report["slot_bytes"] // 3
    assert int4["blob_bytes"] <= report["slot_bytes"] // 6
    for row in report["rows"]:
        assert row["bytes_read_per_token"] == pytest.approx(
            row["misses_per_token"] * row["blob_bytes"])
    # Quantization costs little perplexity on the built-in model.
    assert int8["perplexity"] == pytest.approx(full["perplexity"], rel=0.02)
    assert int4["perplexity"] == pytest.approx(full["perplexity"], rel=0.1)


def test_slot_format_both_compares_compressed_and_dequantized_slots(capsys):
    """Two rows per scheme: the same budget holds more compressed slots, so they read fewer
    bytes per token, and both compute the same model (same perplexity to rounding)."""
    assert cli.main(["run", "--json", "--max-new-tokens", "3", "--eval-tokens", "24",
                     "--router-delta", "none", "--learned-delta", "none", "--reuse-bias", "0",
                     "--memory-budget", "1MiB", "--quantize", "int4:g32",
                     "--slot-format", "both"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["original", "original@int4:g32/compressed",
                          "original@int4:g32/dequantized"]
    packed, dense = rows["original@int4:g32/compressed"], rows["original@int4:g32/dequantized"]
    assert packed["slot_format"] == "compressed" and dense["slot_format"] == "dequantized"
    assert packed["quantize"] == dense["quantize"] == "int4:g32"
    assert packed["hit_rate"] > dense["hit_rate"]
    assert packed["bytes_read_per_token"] < dense["bytes_read_per_token"]
    assert packed["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)


def test_quantize_refuses_an_unknown_scheme(capsys):
    assert cli.main(["run", "--quantize", "int8,int3"]) == 2
    assert "--quantize 'int3'" in capsys.readouterr().err


def _learned_delta(path, source: str, strengths) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from remoe_engine.finetune.bias import LearnedBias
    from remoe_engine.finetune.delta import save_router_delta

    model = AutoModelForCausalLM.from_pretrained(zoo.path("tiny"))
    learned = LearnedBias(source, torch.tensor(strengths, dtype=torch.float32), slots=8)
    return str(save_router_delta(model, path, reuse_bias=learned))


def test_learned_row_runs_with_the_deltas_strengths(tmp_path, capsys):
    """A delta with a learned bias adds the "learned" row, routed with its own strengths and
    source (here "previous", while the +bias rows use the card's "resident")."""
    delta = _learned_delta(tmp_path / "learned.safetensors", "previous",
                           [[0.0], [0.03], [0.01], [0.02]])
    assert cli.main(["run", "--json", "--max-new-tokens", "3", "--eval-tokens", "16",
                     "--learned-delta", delta, "--reuse-bias", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["original", "remoe", "learned"]
    learned = rows["learned"]
    assert learned["router"] == "learned" and learned["bias_source"] == "previous"
    assert learned["reuse_bias"] == pytest.approx(0.03)
    # The bias changed the routing: fewer experts agree with the original router.
    assert learned["topk_agreement"] < 1.0
    assert learned["eor"] > rows["original"]["eor"]


def test_learned_delta_must_carry_a_bias(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from remoe_engine.finetune.delta import save_router_delta

    plain = save_router_delta(AutoModelForCausalLM.from_pretrained(zoo.path("tiny")),
                              tmp_path / "plain.safetensors")
    capsys.readouterr()  # the loading bar above
    assert cli.main(["run", "--learned-delta", str(plain), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no learned reuse bias" in err and len(err.splitlines()) == 1
