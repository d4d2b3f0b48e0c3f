"""`remoe serve` against the official `openai` client, on the built-in model, over loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import remoe_engine  # noqa: E402
from remoe_engine import zoo  # noqa: E402
from remoe_engine.serve import Engine, build_app  # noqa: E402

pytestmark = pytest.mark.slow  # a server, a model and many requests

PROMPTS = ["def read_config(path):", "import os\n", "class Parser:", "for i in range(",
           "return self.", "with open(", "print(", "if __name__ =="]


@pytest.fixture(scope="module")
def server():
    from transformers import AutoTokenizer

    path = zoo.path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # 4 slots per layer for top-4 routing: concurrent requests contend for the pool.
    model = remoe_engine.load(path, slots_per_layer=4, dtype=torch.float32, device="cpu",
                              reuse_bias=0.02, bias_source="previous")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = Engine(model, tokenizer, "tiny")
    config = uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield dict(url=f"http://127.0.0.1:{port}", engine=engine, model=model, tokenizer=tokenizer)
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def _greedy(server, prompt: str, n: int) -> str:
    """What generate() gives alone, for the same prompt."""
    tok, model = server["tokenizer"], server["model"]
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id or 0)
    generated = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in generated:
        generated = generated[: generated.index(tok.eos_token_id)]
    return tok.decode(generated, skip_special_tokens=True)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}


def test_completion_is_generate_greedy(server, client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0)
    assert out.choices[0].text == _greedy(server, PROMPTS[0], 12)
    assert out.usage.completion_tokens <= 12 and out.choices[0].finish_reason in ("length",
                                                                                 "stop")


def test_streaming_equals_the_whole_answer(server, client):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10,
                                      temperature=0).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True)]
    assert "".join(parts) == whole


def test_chat_plain_and_streamed(server, client):
    messages = [{"role": "user", "content": "write a function"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                           temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and isinstance(text, str)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True))
    assert streamed == text


def test_eight_concurrent_clients_get_their_own_tokens(server, client):
    want = [_greedy(server, p, 10) for p in PROMPTS]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda p: client.completions.create(
            model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text, PROMPTS))
    assert got == want


def test_bad_requests_get_the_openai_error_shape(server, client):
    bad = httpx.post(server["url"] + "/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("the body")
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny", prompt="x " * 2000, max_tokens=4000)
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)


def test_a_client_leaving_mid_stream_frees_the_engine(server, client):
    before = server["engine"].metrics.cancelled
    with httpx.stream("POST", server["url"] + "/v1/completions",
                      json={"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 400,
                            "temperature": 0, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                json.loads(line[6:])
                break  # leave after the first piece
    deadline = time.monotonic() + 60
    while server["engine"].metrics.cancelled == before:
        assert time.monotonic() < deadline, "the abandoned stream was never cancelled"
        time.sleep(0.05)
    # The engine is free: the next request is answered, correctly.
    out = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=6,
                                    temperature=0)
    assert out.choices[0].text == _greedy(server, PROMPTS[3], 6)


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=4, temperature=0)
    text = httpx.get(server["url"] + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["remoe_requests_total"] >= 1 and values["remoe_generated_tokens_total"] >= 4
    assert 0.0 <= values["remoe_hit_rate"] <= 1.0 and values["remoe_bytes_read_total"] > 0
    assert values["remoe_tpot_seconds_p50"] > 0


def test_serve_command_serves_a_compressed_pack(tmp_path, monkeypatch):
    """`remoe serve --packed FILE --slot-format compressed`: the command loads the int4 pack with
    compressed slots and serves it (uvicorn.run replaced by an in-process client that asks for
    one completion: everything but the socket)."""
    from fastapi.testclient import TestClient

    from remoe_engine import cli
    from remoe_engine.store import ExpertStore

    packed = ExpertStore.from_checkpoint(zoo.path("tiny")).pack(
        tmp_path / "int4.remoe", progress=False, quantize="int4:g32")
    seen = {}

    def serve_once(app, host, port, log_level):
        with TestClient(app) as client:
            seen["completion"] = client.post("/v1/completions", json=dict(
                model="tiny", prompt="def read_config(path):", max_tokens=4)).json()
            seen["metrics"] = client.get("/metrics").text

    monkeypatch.setattr(uvicorn, "run", serve_once)
    assert cli.main(["serve", "--packed", str(packed), "--slot-format", "compressed",
                     "--memory-budget", "1MiB", "--name", "tiny"]) == 0
    assert seen["completion"]["choices"][0]["text"]
    assert seen["completion"]["usage"]["completion_tokens"] == 4
    metrics = dict(line.rsplit(" ", 1) for line in seen["metrics"].splitlines()
                   if not line.startswith("#"))
    assert metrics['remoe_pool_info{slot_format="compressed",experts_kernel="fused"}'] == "1"
    assert int(metrics["remoe_pool_slot_bytes"]) < 48 * 1024  # an int4 blob, not a float32 slot
    # The pool missed (1 MiB of 12), so compute waited for loads: the stall counter moves.
    assert float(metrics["remoe_stall_seconds_total"]) > 0
    assert cli.main(["serve", "--packed", str(tmp_path / "missing.remoe")]) == 2
