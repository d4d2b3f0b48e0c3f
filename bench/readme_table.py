"""Generate the README's results tables from bench/results/*.json (never typed by hand).

    python bench/readme_table.py            # rewrite the block between the README markers
    python bench/readme_table.py --check    # exit 1 if the README is out of date (tests use it)

Each results family has its own summarizer; files of the same family are summarized newest
first, so a new run replaces the figures it updates.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _latest(pattern: str) -> tuple[str, dict] | None:
    paths = sorted(glob.glob(os.path.join(ROOT, "bench", "results", pattern)))
    if not paths:
        return None
    with open(paths[-1]) as f:
        return os.path.relpath(paths[-1], ROOT), json.load(f)


def routing_table() -> list[str]:
    found = _latest("routing-cpu-*.json")
    if not found:
        return []
    path, data = found
    lines = [f"**Fused routing, CPU** ([`{path}`]({path}), {data['date']}, "
             f"{data['versions'].get('threads', '?')} thread): speedup of `route_topk` over the "
             "pure-PyTorch reference and over plain torch (softmax + bias + topk + gather), "
             "min / median over the E x K grid.", "",
             "| phase | reuse bias | shapes | vs reference | vs plain torch |",
             "|---|---|---|---|---|"]
    for phase in ("decode", "prefill"):
        for bias in sorted({r["reuse_bias"] for r in data["rows"]}):
            rows = [r for r in data["rows"] if r["phase"] == phase and r["reuse_bias"] == bias]
            if not rows:
                continue
            ref = [r["speedup_vs_reference"] for r in rows]
            torch_ = [r["speedup_vs_torch"] for r in rows]
            ts = sorted({r["T"] for r in rows})
            lines.append(f"| {phase} (T={','.join(map(str, ts))}) | {bias} | {len(rows)} | "
                         f"{min(ref):.1f}x / {statistics.median(ref):.1f}x | "
                         f"{min(torch_):.2f}x / {statistics.median(torch_):.2f}x |")
    return lines


def pool_table() -> list[str]:
    found = _latest("pool-cpu-*.json")
    if not found:
        return []
    path, data = found
    lines = [f"**Expert reader, CPU** ([`{path}`]({path}), {data['date']}): packed file of "
             f"{data['setup']['experts']} experts of {data['setup']['expert_bytes'] >> 20} MiB, "
             "page cache dropped before every round.", "",
             "| reader | threads | GB/s | raw read, same mode | fraction of raw |",
             "|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["provider"] == "pool":
            lines.append(f"| pool, {r['mode']} | {r['threads']} | {r['gbps']:.2f} | "
                         f"{r['raw_same_mode_gbps']:.2f} | {r['fraction_of_raw_same_mode']:.2f} |")
    integrity = {r["provider"].removeprefix("integrity_"): r for r in data["rows"]
                 if r["provider"].startswith("integrity_")}
    if integrity:
        first = next(iter(integrity.values()))
        rounds = len(first["rounds_s"])
        crc = (f" The check alone: CRC32C ({first['crc32c_impl']}) runs at "
               f"{first['crc32c_gbps']:.1f} GB/s on one core, "
               f"{100 * first['crc32c_time_vs_blob_read']:.1f}% of the time reading the blob "
               "takes; the reader threads overlap it with other reads."
               if "crc32c_gbps" in first else "")
        lines += ["", f"The per-blob CRC32C check and the bf16 -> fp32 conversion into slots "
                  f"(O_DIRECT, 4 threads, every expert once per round in a random order, 8 per "
                  f"acquire; {rounds} rounds interleaved on / off / convert).{crc}", "",
                  "| pool | GB/s | time vs check off (medians) | paired, median of rounds |",
                  "|---|---|---|---|"]
        names = {"no_verify": "check off", "verify": "CRC32C check on (default)",
                 "verify_convert_fp32": "check on + bf16 -> fp32 conversion"}
        for key, label in names.items():
            if key in integrity:
                r = integrity[key]
                lines.append(f"| {label} | {r['gbps']:.2f} | {r['time_vs_no_verify']:.3f} | "
                             f"{r.get('paired_time_vs_no_verify', float('nan')):.3f} |")
    return lines


def e2e_table() -> list[str]:
    found = _latest("e2e-cpu-*.json")
    if not found:
        return []
    path, data = found
    m, res = data["model"], data["results"]
    bw = res.get("bandwidth", {})
    lines = [f"**Decode, CPU** ([`{path}`]({path}), {data['date']}): Qwen3-MoE shape, hidden "
             f"{m['hidden']}, {m['layers']} layers, {m['experts']} experts, top-{m['top_k']}, "
             f"{m['dtype']}, batch 1; storage read {bw.get('disk_read_gbps', 0):.2f} GB/s "
             "(O_DIRECT).", "",
             "| provider | slots/layer | TPOT ms (p50) | floor ms | hit rate | vs accelerate |",
             "|---|---|---|---|---|---|"]
    if "transformers" in res:
        lines.append(f"| transformers, in memory | all | {res['transformers']['tpot_ms_p50']:.1f}"
                     " | - | - | - |")
    for name, row in res.items():
        if not name.startswith(("remoe_", "accelerate_")):
            continue
        provider, slots = name.rsplit("-slots", 1)
        floor = f"{row['floor_ms']:.1f}" if "floor_ms" in row else "-"
        hit = f"{row['hit_rate']:.2f}" if "hit_rate" in row else "-"
        speedup = (f"{row['speedup_vs_accelerate_disk']:.1f}x"
                   if "speedup_vs_accelerate_disk" in row else "-")
        lines.append(f"| {provider} | {slots} | {row['tpot_ms_p50']:.1f} | {floor} | {hit} | "
                     f"{speedup} |")
    return lines


def run_table() -> list[str]:
    found = _latest("run-cpu-*.json")
    if not found:
        return []
    path, data = found
    lines = [f"**`remoe run`, CPU** ([`{path}`]({path}), {data['date']}, `{data['command']}`): "
             f"the built-in model, experts read from disk (O_DIRECT: {data['o_direct']}) under "
             f"{data['memory_budget'] / 2**20:.0f} MiB of "
             f"{data['expert_bytes'] / 2**20:.0f} MiB of experts, {data['eval_tokens']} held-out "
             "tokens decoded one at a time, every token through each configuration and through "
             "a copy with every expert resident (the floor's compute term) before the next. "
             "Top-k agreement: with the original router on the same hidden states.", "",
             "| router | reuse bias | hit rate | KB read / token | TPOT ms | floor ms "
             "| TPOT / floor | ppl | EOR | top-k agreement |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        bias = f"{r['reuse_bias']} {r['bias_source']}" if r["reuse_bias"] else "-"
        lines.append(f"| {r['router']} | {bias} | {r['hit_rate']:.3f} | "
                     f"{r['bytes_read_per_token'] / 1024:.0f} | {r['tpot_ms']:.2f} | "
                     f"{r['floor_ms']:.2f} | {r['tpot_ms'] / r['floor_ms']:.2f}x | "
                     f"{r['perplexity']:.2f} | {r['eor']:.3f} | {r['topk_agreement']:.3f} |")
    return lines


def quantize_tables() -> list[list[str]]:
    """`remoe run --quantize` runs (bench/results/quantize-cpu-*.json), one table each, every
    row against the bf16 row of the same run."""
    tables = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "quantize-cpu-*.json"))):
        with open(path) as f:
            data = json.load(f)
        path = os.path.relpath(path, ROOT)
        rows = data["rows"]
        # Rows written before compressed slots existed held dequantized slots.
        for r in rows:
            r.setdefault("slot_format", "dequantized")
        base = next((r for r in rows if r.get("quantize") == "bf16"
                     and r["slot_format"] == "dequantized"), rows[0])
        budget = data["memory_budget"]
        lines = [f"**Compressed experts, CPU** ([`{path}`]({path}), {data['date']}, "
                 f"`{data['command']}`): the built-in model, experts read from disk (O_DIRECT: "
                 f"{data['o_direct']}) under {budget / 2**20:.2f} MiB of "
                 f"{data['expert_bytes'] / 2**20:.0f} MiB of experts, {data['eval_tokens']} "
                 "held-out tokens decoded one at a time, every configuration in the same "
                 "interleaved run; ratios against the bf16 row with dequantized slots "
                 f"({base['name']}). Slots: \"dequantized\" holds each expert in float32 (the "
                 "compute dtype), \"compressed\" its blob (the fused op decodes it), so the "
                 "same budget holds more experts.", "",
                 "| experts stored as | slots | bytes / expert | slots in budget "
                 "| KB read / token | read vs bf16 | hit rate | TPOT ms | TPOT vs bf16 | floor ms "
                 "| ppl | ppl vs bf16 | EOR |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            stored = r.get("quantize") or "float32 (checkpoint)"
            read = r["bytes_read_per_token"]
            ratio = base["bytes_read_per_token"] / read if read else float("inf")
            versus = f"{ratio:.2f}x less" if ratio >= 1 else f"{1 / ratio:.2f}x more"
            slot_bytes = (r["blob_bytes"] if r["slot_format"] == "compressed"
                          else data["expert_bytes"] // (data["layers"] * data["experts"]))
            lines.append(
                f"| {stored} | {r['slot_format']} | {r['blob_bytes']} | "
                f"{budget // slot_bytes} | {read / 1024:.0f} | {versus} | "
                f"{r['hit_rate']:.3f} | "
                f"{r['tpot_ms']:.1f} | {base['tpot_ms'] / r['tpot_ms']:.2f}x | "
                f"{r['floor_ms']:.1f} | {r['perplexity']:.2f} | "
                f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | {r['eor']:.3f} |")
        tables.append(lines)
    return tables


def compressed_compute_table() -> list[str]:
    found = _latest("compressed-compute-cpu-*.json")
    if not found:
        return []
    path, data = found
    load = "/".join(f"{x:.1f}" for x in data["load_average"])
    e = data["expert"]
    lines = [f"**Computing from compressed slots, CPU** ([`{path}`]({path}), {data['date']}, "
             f"`{data['command']}`): one MoE layer of experts of Qwen3-30B-A3B's shape "
             f"(H={e['H']}, I={e['I']}, K={e['K']}) computed by the fused op from compressed "
             "blobs (`ops.moe_experts_compressed`) and from the same experts dequantized into "
             f"float32 / bfloat16 slots (`ops.moe_experts`), {data['machine']['threads']} "
             f"thread(s), median of {data['rounds']} interleaved rounds, load average {load}. "
             "decode: 1 token (codes decoded in registers); prefill: 128 tokens over "
             f"{e['slots']} experts (routed blobs dequantized into a scratch, then BLAS). "
             "GB/s: the slot bytes the call reads.", "",
             "| case | slots hold | bytes / slot | ms / layer | GB/s of slots "
             "| time vs bf16 slots |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['case']} | {r['provider']} | {r['slot_bytes']} | {r['ms']:.2f} | "
                     f"{r['gbps']:.1f} | {r['vs_bf16']:.2f}x |")
    return lines


def _less(ratio: float) -> str:
    """A bytes-read ratio against the baseline; infinite when the row read nothing."""
    return "nothing read (all resident)" if ratio == float("inf") else f"{ratio:.2f}x less"


def _below_floor_note(rows: list[dict]) -> str:
    """The footnote of the rows whose median TPOT came out below their floor (starred)."""
    below = [r for r in rows if r["tpot_ms_p50"] < r["floor_ms"]]
    if not below:
        return ""
    worst = max(1 - r["tpot_ms_p50"] / r["floor_ms"] for r in below)
    hit = min(r["hit_rate"] for r in below)
    return (f" \\* TPOT below its floor, by at most {100 * worst:.1f}%: these rows missed little "
            f"or nothing (hit rate >= {hit:.3f}), so they ran nearly their full-cache twin's "
            "work, and TPOT and floor are two medians of about the same computation.")


def quant_e2e_table() -> list[str]:
    """bench/bench_quant_e2e.py: every compressed scheme on the e2e model at one budget, against
    the bf16 row of the same run."""
    found = _latest("quant-e2e-cpu-*.json")
    if not found:
        return []
    path, data = found
    m, rows = data["model"], data["rows"]
    base = next(r for r in rows if r["name"] == "bf16")
    load = "/".join(f"{x:.1f}" for x in (data["load_average"]["before"][0],
                                         data["load_average"]["after"][0]))
    lines = [f"**Compressed experts on the e2e model, CPU** ([`{path}`]({path}), {data['date']}, "
             f"`{data['command']}`): Qwen3-MoE shape (hidden {m['hidden']}, {m['layers']} layers, "
             f"{m['experts']} experts, top-{m['top_k']}, random weights), computing in "
             f"{m['compute_dtype']}, experts read from disk (O_DIRECT, "
             f"{data['read_gbps']:.2f} GB/s sequential) under the same "
             f"{data['memory_budget'] / 2**20:.0f} MiB for every row ({data['budget_note']}); "
             f"{data['rounds']} rounds of {data['tokens_per_round']} decode steps, providers "
             f"interleaved round by round, {data['machine']['torch_threads']} torch thread, "
             f"machine load average {load}. Decoded tokens are a fixed random sequence, the same "
             "for every row (greedy decoding of this random model repeats one token). Floor = "
             "max(TPOT with every expert resident, bytes read per token / sequential read "
             "bandwidth); stall = time the forward waited for loads (read, check, dequantize). "
             "Logit error: one 64-token forward against the bf16 row (each row first checked "
             "against transformers with the same expert weights, <= 1e-5). Targets (issue 14): "
             "bytes read 1.9x (8-bit) / 3.5x (4-bit) less, TPOT 1.5x / 2.5x faster than bf16; "
             f"{100 * data['bf16_tpot_share_beyond_compute']:.0f}% of bf16's TPOT is beyond "
             "compute, so a row that read nothing at all from float32 slots would be "
             f"{1 / (1 - data['bf16_tpot_share_beyond_compute']):.2f}x faster than bf16. "
             + _below_floor_note(rows), "",
             "| experts stored as | slots: how many | bytes / expert | KB read / token "
             "| read vs bf16 | hit rate | TPOT ms | TPOT vs bf16 | floor ms (compute / reads) "
             "| stall ms / token | max logit error (relative) | greedy agreement "
             "| targets (read / TPOT) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "-"
        if "target" in r:
            target = (f"{r['target']['bytes_less']}x {'met' if r['bytes_target_met'] else 'missed'}"
                      f" / {r['target']['tpot_speedup']}x "
                      f"{'met' if r['tpot_target_met'] else 'missed'}")
        lines.append(
            f"| {r['name']} | {r['slots']}: {r['pool_slots']} | {r['blob_bytes']} | "
            f"{r['bytes_read_per_token'] / 1024:.0f} | "
            f"{_less(r['bytes_less_than_bf16'])} | "
            f"{r['hit_rate']:.3f} | {r['tpot_ms_p50']:.1f} | "
            f"{base['tpot_ms_p50'] / r['tpot_ms_p50']:.2f}x | {r['floor_ms']:.1f}"
            f"{'*' if r['tpot_ms_p50'] < r['floor_ms'] else ''} "
            f"({r['compute_floor_ms']:.1f} / {r['io_floor_ms']:.1f}) | "
            f"{r['stall_ms_per_token']:.1f} | {r['logit_max_abs_vs_bf16']:.3f} "
            f"({r['logit_rel_vs_bf16']:.3f}) | {r['greedy_agreement_vs_bf16']:.3f} | {target} |")
    return lines


def dequant_table() -> list[str]:
    found = _latest("quant-cpu-*.json")
    if not found:
        return []
    path, data = found
    load = "/".join(f"{x:.1f}" for x in data["load_average"])
    lines = [f"**Dequantize on load, CPU** ([`{path}`]({path}), {data['date']}, "
             f"`{data['command']}`): one expert of Qwen3-30B-A3B's shape "
             f"(H={data['expert']['H']}, I={data['expert']['I']}) dequantized by the reader "
             f"thread's function into a slot, median of {data['rounds']} interleaved rounds, next "
             f"to reading its compressed blob at {data['storage_gbps']:.2f} GB/s (O_DIRECT, "
             f"measured); machine load average {load} (shared), so the CPU time is given too. "
             "read / dequant below 1: one reader thread dequantizes slower than it reads.", "",
             "| stored as | slot dtype | blob bytes | dequant ms (wall) | dequant ms (CPU) "
             "| read ms | read / dequant (CPU) |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['scheme']} | {r['slot_dtype']} | {r['blob_bytes']} | "
                     f"{r['ms_per_expert']:.1f} | {r['cpu_ms_per_expert']:.1f} | "
                     f"{r['read_ms']:.2f} | {r['read_over_dequant_cpu']:.2f} |")
    return lines


def learned_bias_table() -> list[str]:
    """Issue 16's comparison (bench/experiments/learned_bias.py writes the results and owns the
    table, so the README and the model card show the same one)."""
    found = _latest("learned-bias-*.json")
    if not found:
        return []
    path, data = found
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "learned_bias", os.path.join(ROOT, "bench", "experiments", "learned_bias.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return (module.table(data, path)
            + ["", "Against the target (perplexity within +0.5% on both texts, KB read per token "
               "at the budget at least 35% below the original router):", ""]
            + module.verdict(data)
            + ["", "![KB read per token against perplexity](docs/img/learned_bias_pareto.png)"])


def families_table() -> list[str]:
    found = _latest("families-*.json")
    if not found:
        return []
    path, data = found
    results = data["results"]
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    built = len(results) - counts.get("not built", 0)
    exact = counts.get("exact", 0) + counts.get("exact, no bias", 0)
    lines = [f"**Families** ([`{path}`]({path}), {data['date']}, `{data['command']}`, transformers "
             f"{data['versions']['transformers']}): every model type whose experts go through "
             f"ExpertsInterface, as a tiny random model: patch() at a full cache and at top_k "
             f"slots per layer (with the experts kernel patch() chooses, and with the per-expert "
             f"loop), and load() of its saved checkpoint, against transformers (fp32 "
             f"logits <= 1e-5, same greedy tokens). {exact} of the {built} that build run exactly "
             f"({', '.join(f'{n} {o}' for o, n in counts.items())}). \"exact, no bias\": "
             "route_topk cannot reproduce the router, which then runs as it is (the reuse bias is "
             "refused). Experts: \"fused\" is the one-call C++ op (`ops.moe_experts`); "
             "\"loop\" the per-expert path, with the reason.", "",
             "| model type | outcome | routing | experts | reason |", "|---|---|---|---|---|"]
    for r in results:
        reason = r["reason"].replace("|", "/")
        experts = r.get("experts", "").replace("|", "/")
        if experts.startswith("per-expert ("):
            experts = "loop: " + experts[len("per-expert ("):-1]
        lines.append(f"| {r['model_type']} | {r['outcome']} | {r['routing'] or '-'} | "
                     f"{experts or '-'} | {reason or '-'} |")
    return lines


def experts_table() -> list[str]:
    found = _latest("experts-cpu-*.json")
    if not found:
        return []
    path, data = found
    lines = [f"**The experts' compute at a full cache, CPU** ([`{path}`]({path}), {data['date']}, "
             f"`{data['command']}`): transformers' own `grouped_mm` experts, remoe's per-expert "
             "loop and the fused op (`ops.moe_experts`, one call per layer); each decode step runs "
             "once per provider in turn (each with its own KV cache), over "
             f"{data['rounds']} rounds; TPOT is the median of "
             f"{data['new_tokens']} greedy decode steps per round, prefill one "
             f"{data['prefill_tokens']}-token forward. Ratios below 1 mean the fused op is "
             "faster. The step breakdown times the fused model's experts, routers and attention "
             "modules in a separate pass." + (f" {data['note']}" if data.get("note") else ""), "",
             "| model | dtype | threads | TPOT ms transformers / loop / fused | fused vs "
             "transformers | fused vs loop | prefill ms transformers / loop / fused | fused vs "
             "transformers | step ms: experts / routing / attention / rest |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        t, p, b = r["tpot_ms"], r["prefill_ms"], r["fused_step_breakdown_ms"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['threads']} | {t['transformers']:.1f} / "
            f"{t['loop']:.1f} / {t['fused']:.1f} | {r['fused_tpot_vs_transformers']:.2f}x | "
            f"{r['fused_tpot_vs_loop']:.2f}x | {p['transformers']:.0f} / {p['loop']:.0f} / "
            f"{p['fused']:.0f} | {r['fused_prefill_vs_transformers']:.2f}x | "
            f"{b['experts']:.1f} / {b['routing']:.1f} / {b['attention']:.1f} / {b['rest']:.1f} |")
    return lines


def serve_table() -> list[str]:
    found = _latest("serve-cpu-*.json")
    if not found:
        return []
    path, data = found
    lines = [f"**`remoe serve` under load, CPU** ([`{path}`]({path}), {data['date']}, "
             f"`{data['command']}`): the built-in model, experts from disk under "
             f"{data['memory_budget'] / 2**20:.0f} MiB, streaming greedy clients, "
             f"{data['max_tokens']} tokens per request, client counts interleaved over "
             f"{data['rounds']} rounds; batching {data['batching']}. Forwards are serialized, so "
             "throughput stays about flat while latency grows with the clients.", "",
             "| clients | requests | tokens/s | TTFT ms p50 / p99 | TPOT ms p50 / p99 | hit rate "
             "| KB read / token |", "|---|---|---|---|---|---|---|"]
    for key in sorted(data["results"], key=int):
        r = data["results"][key]
        lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | "
                     f"{r['tpot_ms_p50']:.1f} / {r['tpot_ms_p99']:.1f} | {r['hit_rate']:.3f} | "
                     f"{r['bytes_read_per_token'] / 1024:.0f} |")
    return lines


def gpu_table() -> list[str]:
    found = _latest("gpu-*.json")
    if not found:
        return ["**GPU**: no GPU run recorded yet (`bash bench/gpu_check.sh` writes one)."]
    path, data = found
    t = data["tests"]
    return [f"**GPU** ([`{path}`]({path}), {data['date']}, {data['gpu']}): CUDA tests "
            f"{t.get('tests', 0) - t.get('failures', 0) - t.get('errors', 0)} passed of "
            f"{t.get('tests', 0)}."]


def prefetch_table() -> list[str]:
    found = _latest("prefetch-cpu-*.json")
    if not found:
        return []
    path, data = found
    setup = data["results"]["setup"]
    lines = [f"**Next-layer prefetch, CPU** ([`{path}`]({path}), {data['date']}): the built-in "
             f"model, experts read from disk (O_DIRECT: {setup['o_direct']}, "
             f"{setup['read_gbps']:.2f} GB/s), {setup['tokens']} held-out tokens decoded one at "
             "a time; prefetched = loads started by guesses, used = the share of them hit "
             "before eviction (such a hit counts in the hit rate too, so compare bytes read).",
             "",
             "| pool | router | prefetch | TPOT ms | KB read / token | hit rate | "
             "prefetched / token | used | bytes vs off |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in data["results"].items():
        if key == "setup":
            continue
        used = "-" if r["prefetch_used"] is None else f"{r['prefetch_used']:.2f}"
        ratio = f"{r['bytes_read_vs_off']:.2f}x" if "bytes_read_vs_off" in r else "-"
        lines.append(f"| {r['pool']} | {r['router']} | {'on' if r['prefetch'] else 'off'} | "
                     f"{r['tpot_ms_p50']:.2f} | {r['bytes_read_per_token'] / 1024:.0f} | "
                     f"{r['hit_rate']:.3f} | {r['prefetches_per_token']:.2f} | {used} | "
                     f"{ratio} |")
    return lines


def _b(row: dict) -> str:
    """B of a scale row: raw reads / the pool's own reader (the floor uses the larger)."""
    if "read_gbps_pool" in row:
        return f"{row['read_gbps_raw']:.2f} / {row['read_gbps_pool']:.2f}"
    return f"{row['read_gbps']:.2f}"


def scale_table(found: tuple[str, dict] | None = None) -> list[str]:
    found = found or _latest("scale-cpu-*.json")
    if not found:
        return []
    path, data = found
    spec, machine = data["spec"], data["machine"]
    first = data["rows"][0] if data["rows"] else {}
    lines = [f"**Scale, CPU** ([`{path}`]({path}), {data['date']}): Qwen3-30B-A3B's shape (hidden "
             f"{spec['hidden_size']}, {spec['num_experts']} experts, top-"
             f"{spec['num_experts_per_tok']}, expert FFN {spec['moe_intermediate_size']}, "
             f"{spec['dtype']}) with random weights, {spec['layers']} layers, vocabulary "
             f"{spec['vocab_size']}: {spec['expert_bytes'] / 2**30:.1f} GiB of experts, "
             f"{spec['experts_over_mem_total']:.2f}x the machine's "
             f"{machine['mem_total_bytes'] / 2**30:.0f} GiB of RAM, on {machine['filesystem']}. "
             f"Each run is a fresh process: `load()`, a {spec['prompt']}-token prompt, "
             f"{spec['tokens']} greedy decode steps, page cache dropped "
             f"({first.get('page_cache_drop', '?')}) before the load and before measuring B "
             f"({spec['threads']} threads, the pool's mode: random whole-expert reads into one "
             "buffer per thread, and the engine's reader taking random experts into a fresh pool "
             "of the run's budget; B is the larger). Floor = max(compute with every expert "
             "resident, bytes read per token / B); spread: "
             f"embeddings x{spec['spread']['embed_scale']:g} and attention o_proj "
             f"x{spec['spread']['o_proj_scale']:g} after loading (experts and routers untouched). "
             "Targets: TPOT <= 1.2x floor where reads dominate; peak RSS <= 1.1x (non-expert "
             "weights + budget). A TPOT / floor below 1 (marked *) means B was measured too low "
             "for that row: the engine read faster during the decode (column 'decode reads') "
             "than the disk gave the bandwidth probes, which vary by up to 2x run to run on "
             "this VM; the floor does not hold there and the target cannot be judged.", "",
             "| source | budget | routing | read | load s | TTFT ms | TPOT ms p50 / mean | "
             "floor ms (compute / reads) | TPOT / floor | hit rate | experts / layer | "
             "MB read / token | B GB/s (raw / reader) | decode reads GB/s | peak RSS GiB | "
             "RSS / bound (less imports) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(
            f"| {r['source']} | {r['budget']} | {r['variant']} | {r['read_mode']} | "
            f"{r['load_s']:.1f} | {r['ttft_ms']:.0f} | {r['tpot_ms_p50']:.0f} / "
            f"{r['tpot_ms_mean']:.0f} | {r['floor_ms']:.0f} ({r['t_compute_ms']:.0f} / "
            f"{r['io_floor_ms']:.0f}) | {r['tpot_over_floor']:.2f}"
            f"{'' if r.get('floor_holds', True) else '*'} | {r['hit_rate']:.2f} | "
            f"{r['distinct_experts_per_layer']['mean']:.0f} | "
            f"{r['bytes_read_per_token'] / 1e6:.0f} | {_b(r)} | "
            f"{r.get('decode_read_gbps', float('nan')):.2f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['peak_rss_over_bound']:.2f} "
            f"({r['peak_rss_less_baseline_over_bound']:.2f}) |")
    return lines


def render() -> str:
    blocks = [table for table in (run_table(), learned_bias_table(), *quantize_tables(),
                                  quant_e2e_table(), dequant_table(),
                                  compressed_compute_table(), serve_table(), experts_table(),
                                  families_table(), routing_table(),
                                  pool_table(), e2e_table(), prefetch_table(), scale_table(),
                                  gpu_table())
              if table]
    body = "\n\n".join("\n".join(block) for block in blocks)
    return f"{BEGIN}\n<!-- generated by bench/readme_table.py from bench/results/*.json -->\n" \
           f"{body}\n{END}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the README is stale")
    args = parser.parse_args()
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = head + render() + tail
    if args.check:
        if updated != readme:
            print("README.md results are stale: run python bench/readme_table.py",
                  file=sys.stderr)
            return 1
        return 0
    with open(readme_path, "w") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
