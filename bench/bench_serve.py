"""`remoe serve` under load: 1, 4 and 16 concurrent streaming clients on the built-in model.

The server runs in this process on a free loopback port, over the built-in model with its experts
streamed from disk under a quarter of them (`remoe run`'s default budget, global scope). Each
client sends its requests one after another, streaming, greedy, 32 new tokens each; the client
counts are interleaved round by round (1, 4, 16, 1, 4, 16, ...) so the machine's noise falls on
all alike. Per client count: throughput (generated tokens per second of wall time), TTFT (request
to first streamed piece) and TPOT (mean gap between pieces after the first) at p50 and p99, and
from the engine's own counters the hit rate and bytes read per generated token.

Concurrent requests are not batched into one forward (see `remoe_engine/serve.py`): forwards are
serialized, so throughput should stay about flat with the client count while TTFT and TPOT grow
with it. There is no batching to compare against yet.

Run:  OMP_NUM_THREADS=1 pytest bench/bench_serve.py --benchmark-json=/tmp/serve.json
      REMOE_BENCH_SERVE_OUT=bench/results/serve-cpu-$(date +%F).json \\
          OMP_NUM_THREADS=1 pytest bench/bench_serve.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import remoe_engine  # noqa: E402
from remoe_engine import zoo  # noqa: E402
from remoe_engine.serve import Engine, build_app  # noqa: E402

CLIENTS = [1, 4, 16]
ROUNDS = int(os.environ.get("REMOE_BENCH_SERVE_ROUNDS", "2"))
REQUESTS_PER_CLIENT = int(os.environ.get("REMOE_BENCH_SERVE_REQUESTS", "2"))
MAX_TOKENS = 32
PROMPTS = ["def read_config(path):", "import os\n", "class Parser:", "for i in range(",
           "return self.", "with open(", "print(", "if __name__ =="]
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def server():
    from transformers import AutoTokenizer

    from remoe_engine.store import ExpertStore

    path = zoo.path("tiny")
    store = ExpertStore.from_checkpoint(path)
    budget = len(store.layers) * store.num_experts * store.layout.slot_bytes // 4
    model = remoe_engine.load(path, memory_budget=budget, dtype=torch.float32, device="cpu")
    engine = Engine(model, AutoTokenizer.from_pretrained(path), "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port,
                                        log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield dict(url=f"http://127.0.0.1:{port}/v1/completions", model=model, budget=budget)
    srv.should_exit = True
    thread.join(timeout=30)


def _one_request(url: str, prompt: str) -> dict:
    start = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url, json={"model": "tiny", "prompt": prompt, "stream": True,
                                         "max_tokens": MAX_TOKENS, "temperature": 0},
                      timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return dict(ttft=stamps[0] - start if stamps else float("nan"),
                tpot=statistics.mean(gaps) if gaps else float("nan"), pieces=len(stamps))


def _load(server, clients: int) -> dict:
    model = server["model"]
    model.remoe.reset_stats()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(_one_request, server["url"], PROMPTS[(c + r) % len(PROMPTS)])
                   for c in range(clients) for r in range(REQUESTS_PER_CLIENT)]
        requests = [f.result() for f in futures]
    wall = time.perf_counter() - start
    stats = model.remoe.stats()
    lookups = stats["hits"] + stats["misses"]
    return dict(wall_s=wall, requests=requests,
                hit_rate=stats["hits"] / lookups if lookups else 0.0,
                bytes_read=stats["bytes_read"], lookups=lookups)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(v for v in values if v == v)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else 0.0


def test_serve_load(benchmark, server):
    rounds: dict[int, list[dict]] = {c: [] for c in CLIENTS}

    def interleaved():
        for _ in range(ROUNDS):
            for clients in CLIENTS:  # 1, 4, 16, 1, 4, 16, ...
                rounds[clients].append(_load(server, clients))

    benchmark.pedantic(interleaved, rounds=1, iterations=1, warmup_rounds=0)
    for clients, runs in rounds.items():
        requests = [r for run in runs for r in run["requests"]]
        pieces = sum(r["pieces"] for r in requests)
        wall = sum(run["wall_s"] for run in runs)
        row = dict(clients=clients, requests=len(requests), pieces=pieces,
                   tokens_per_s=pieces / wall,
                   ttft_ms_p50=_quantile([r["ttft"] for r in requests], 0.5) * 1e3,
                   ttft_ms_p99=_quantile([r["ttft"] for r in requests], 0.99) * 1e3,
                   tpot_ms_p50=_quantile([r["tpot"] for r in requests], 0.5) * 1e3,
                   tpot_ms_p99=_quantile([r["tpot"] for r in requests], 0.99) * 1e3,
                   hit_rate=statistics.mean(run["hit_rate"] for run in runs),
                   bytes_read_per_token=sum(run["bytes_read"] for run in runs) / max(1, pieces))
        RESULTS[str(clients)] = row
        benchmark.extra_info[f"clients_{clients}"] = row
        assert row["requests"] == clients * REQUESTS_PER_CLIENT * ROUNDS
        assert row["pieces"] > 0


@pytest.fixture(scope="module", autouse=True)
def _write_results(server):
    yield
    out = os.environ.get("REMOE_BENCH_SERVE_OUT")
    if not out or len(RESULTS) < len(CLIENTS):
        return
    import transformers

    payload = dict(
        date=datetime.date.today().isoformat(),
        machine=dict(node=platform.node(), cpus=os.cpu_count(), python=platform.python_version(),
                     threads=torch.get_num_threads()),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      remoe_engine=remoe_engine.__version__),
        model="built-in tiny (zoo)", memory_budget=server["budget"], max_tokens=MAX_TOKENS,
        rounds=ROUNDS, requests_per_client=REQUESTS_PER_CLIENT, batching="off (not built)",
        command=f"REMOE_BENCH_SERVE_OUT={out} OMP_NUM_THREADS=1 pytest bench/bench_serve.py",
        results=RESULTS)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, out)
