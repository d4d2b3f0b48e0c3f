"""`remoe serve`: an OpenAI-compatible HTTP server over one model whose experts stream from disk.

Endpoints: `POST /v1/completions` and `POST /v1/chat/completions` (streaming with server-sent
events, or not), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

Requests run concurrently, each `generate()` in a worker thread; the engine serializes forwards
and keeps each sequence's routing state apart (docs/design.md section 6), so concurrent requests
get the tokens they would get alone. Decode steps of concurrent requests are not batched into one
forward: on this engine a batch routes to the union of its sequences' experts, so a step reads
more experts while the compute it saves is small on one device; one sequence per forward keeps
each request's reads at its own reuse.

Errors have the OpenAI shape `{"error": {"message", "type", "param", "code"}}`. A client that
disconnects mid-stream stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import Request  # at module level: FastAPI resolves the endpoints' annotations here

__all__ = ["Engine", "build_app"]


class RequestError(Exception):
    """A request the server refuses, in the OpenAI error shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Metrics:
    """Counters the /metrics endpoint reports (the pool's own come from the model's Handle)."""

    requests: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    step_seconds: list[float] = field(default_factory=list)  # the last decode steps' TPOT
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Cancel:
    """A stopping criterion that stops generate() when the request is gone."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class Engine:
    """One loaded model and its tokenizer, generating for many requests.

    Args:
        model: a model from `remoe_engine.load` (or patched), in eval mode.
        tokenizer: its tokenizer.
        model_id: the name clients pass as `model`.
    """

    def __init__(self, model, tokenizer, model_id: str) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_positions = int(getattr(model.config.get_text_config(), "max_position_embeddings",
                                         0) or 0)
        self.metrics = Metrics()

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string", "prompt")
        return self.tokenizer(prompt).input_ids

    def encode_chat(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant") for m in messages):
            raise RequestError(400, "messages must be a non-empty list of {role: system|user|"
                               "assistant, content: string}", "messages")
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True))
        # No chat template (the built-in model is a code model): a plain transcript.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer(text).input_ids

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if self.max_positions and len(prompt_ids) + max_tokens > self.max_positions:
            raise RequestError(400, f"this model's context is {self.max_positions} tokens; the "
                               f"prompt has {len(prompt_ids)} and max_tokens is {max_tokens}",
                               "max_tokens", "context_length_exceeded")

    def generate(self, prompt_ids: list[int], params: dict, on_token=None,
                 cancel: _Cancel | None = None) -> tuple[list[int], str]:
        """Generate for one request (blocking; run it in a worker thread).

        Returns:
            (the generated token ids, the finish reason: "stop", "length" or "cancelled").
        """
        from transformers import StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        engine = self

        class _Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen, self.last = False, None

            def put(self, value) -> None:
                now = time.perf_counter()
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    self.last = now
                    return
                with engine.metrics.lock:
                    engine.metrics.step_seconds = (engine.metrics.step_seconds
                                                   + [now - self.last])[-512:]
                self.last = now
                if on_token is not None:
                    for token in value.reshape(-1).tolist():
                        on_token(token)

            def end(self) -> None:
                pass

        cancel = cancel or _Cancel()
        ids = torch.tensor([prompt_ids], device=self.model.device)
        sample = params["temperature"] > 0
        kwargs = dict(do_sample=sample, max_new_tokens=params["max_tokens"],
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0,
                      streamer=_Streamer(), stopping_criteria=StoppingCriteriaList([cancel]))
        if sample:
            kwargs.update(temperature=params["temperature"], top_p=params["top_p"])
        with torch.no_grad():
            out = self.model.generate(ids, **kwargs)
        generated = out[0, len(prompt_ids):].tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in generated:
            generated = generated[: generated.index(eos)]
            reason = "stop"
        elif cancel.event.is_set():
            reason = "cancelled"
        else:
            reason = "length" if len(generated) >= params["max_tokens"] else "stop"
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(prompt_ids)
            self.metrics.generated_tokens += len(generated)
        return generated, reason

    def prometheus(self) -> str:
        """The metrics in Prometheus text format."""
        import statistics

        stats = self.model.remoe.stats() if hasattr(self.model, "remoe") else {}
        lookups = stats.get("hits", 0) + stats.get("misses", 0)
        with self.metrics.lock:
            m = self.metrics
            steps = list(m.step_seconds)
            rows = [
                ("remoe_requests_total", "counter", "requests received", m.requests),
                ("remoe_requests_failed_total", "counter", "requests refused or failed",
                 m.failed),
                ("remoe_requests_cancelled_total", "counter", "streams the client left",
                 m.cancelled),
                ("remoe_prompt_tokens_total", "counter", "prompt tokens", m.prompt_tokens),
                ("remoe_generated_tokens_total", "counter", "generated tokens",
                 m.generated_tokens)]
        rows += [
            ("remoe_tpot_seconds_p50", "gauge", "median decode step over the last 512 steps",
             statistics.median(steps) if steps else 0.0),
            ("remoe_hit_rate", "gauge", "expert lookups served from the pool",
             stats.get("hits", 0) / lookups if lookups else 0.0),
            ("remoe_bytes_read_total", "counter", "expert bytes read from storage",
             stats.get("bytes_read", 0)),
            ("remoe_stall_seconds_total", "counter", "time compute waited for expert loads",
             stats.get("stall_s", 0.0)),
        ]
        if hasattr(self.model, "remoe"):
            pool = self.model.remoe.pool
            kernel = self.model.remoe.experts_kernel.replace('"', "'")
            labels = f'slot_format="{pool.slot_format}",experts_kernel="{kernel}"'
            rows += [
                ("remoe_pool_slots", "gauge", "expert slots in the pool", pool.num_slots),
                ("remoe_pool_slot_bytes", "gauge", "bytes of one expert slot", pool.slot_bytes),
                # An info metric: the labels carry the values.
                ("remoe_pool_info{" + labels + "}", "gauge",
                 "what the slots hold and what computes the experts", 1)]
        lines = []
        for name, kind, help_text, value in rows:
            family = name.split("{", 1)[0]
            lines += [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _params(body: dict) -> dict:
    def number(name: str, default, low, high, kind=float):
        value = body.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                low <= value <= high) or (kind is int and int(value) != value):
            raise RequestError(400, f"{name} must be a number in [{low}, {high}], got {value!r}",
                               name)
        return kind(value)

    return dict(max_tokens=number("max_tokens", 16, 1, 4096, int),
                temperature=number("temperature", 1.0, 0.0, 2.0),
                top_p=number("top_p", 1.0, 0.0, 1.0))


def build_app(engine: Engine):
    """The FastAPI application over one engine."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="remoe-engine", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, error: RequestError):
        with engine.metrics.lock:
            engine.metrics.failed += 1
        return JSONResponse(error.body(), status_code=error.status)

    async def _body(request: Request) -> dict:
        with engine.metrics.lock:
            engine.metrics.requests += 1
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        if body.get("model") not in (None, engine.model_id):
            raise RequestError(404, f"the model {body.get('model')!r} does not exist; this "
                               f"server has {engine.model_id!r}", "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise RequestError(400, "n must be 1", "n")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "created": 0, "owned_by": "remoe-engine"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.prometheus(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(request, chat=True)

    async def _complete(request: Request, chat: bool):
        body = await _body(request)
        params = _params(body)
        prompt_ids = (engine.encode_chat(body.get("messages")) if chat
                      else engine.encode_prompt(body.get("prompt")))
        engine.check_length(prompt_ids, params["max_tokens"])
        return await _respond(engine, body, prompt_ids, params, chat=chat)

    async def _respond(engine: Engine, body: dict, prompt_ids, params, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not body.get("stream"):
            generated, reason = await asyncio.to_thread(engine.generate, prompt_ids, params)
            text = engine.tokenizer.decode(generated, skip_special_tokens=True)
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(generated),
                     "total_tokens": len(prompt_ids) + len(generated)}
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": reason} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                    "created": created, "model": engine.model_id, "choices": [choice],
                    "usage": usage}
        return StreamingResponse(_stream(engine, rid, created, prompt_ids, params, chat),
                                 media_type="text/event-stream")

    return app


async def _stream(engine: Engine, rid: str, created: int, prompt_ids, params, chat: bool):
    """Server-sent events: one chunk per decoded piece of text, then [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = _Cancel()
    tokens: list[int] = []

    def on_token(token: int) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("token", token))

    def run() -> None:
        try:
            result = engine.generate(prompt_ids, params, on_token=on_token, cancel=cancel)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
        except Exception as error:  # reported to the client as the stream's last event
            loop.call_soon_threadsafe(queue.put_nowait, ("error", error))

    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first
                     else {} if delta_text is None else {"content": delta_text})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None,
                      "finish_reason": reason}
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created,
                                      "model": engine.model_id, "choices": [choice]}) + "\n\n"

    worker = threading.Thread(target=run, name=f"remoe-serve-{rid}", daemon=True)
    worker.start()
    sent, finished = "", False
    eos = engine.tokenizer.eos_token_id
    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            event, value = await queue.get()
            if event == "token":
                if value == eos:
                    continue
                tokens.append(value)
                # Decode everything so far and send the new suffix: a token can end inside a
                # multi-byte character, which decodes whole only with its successor.
                text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue
                if len(text) > len(sent):
                    yield chunk(text[len(sent):], None)
                    sent = text
            elif event == "done":
                finished = True
                _, reason = value
                yield chunk(None, reason)
                yield "data: [DONE]\n\n"
                return
            else:
                finished = True
                error = {"error": {"message": f"generation failed: {value}",
                                   "type": "server_error", "param": None, "code": None}}
                yield "data: " + json.dumps(error) + "\n\n"
                return
    finally:
        if not finished:
            # The client left mid-stream: stop generating at the next token.
            cancel.event.set()
            with engine.metrics.lock:
                engine.metrics.cancelled += 1
