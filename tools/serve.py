"""An OpenAI-compatible HTTP server for a trained model (a full checkpoint or a base + LoRA adapter, 4-bit optional,
--device_map=auto for several GPUs), with a small chat page at / that talks to the same endpoint.

    python tools/serve.py --model=/models/Llama-2-7b-hf --adapter=sft/qlora/out/final --prompt_template=chat
    python tools/serve.py --model=tiny --port=8000                    # the tiny Llama, for trying the API
then  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}'
or the official client: OpenAI(base_url="http://localhost:8000/v1", api_key="unused").chat.completions.create(...)

Endpoints: GET /v1/models; POST /v1/chat/completions with messages, max_tokens, temperature (0: greedy), top_p,
stop (a string or a list), seed and stream (server-sent events, as OpenAI's); GET / the chat page; GET /health.
Prompts are rendered as the model was trained (--prompt_template, as in tools/generate.py): chat, the tokenizer's
chat template over the whole conversation; alpaca, the last user message as the Alpaca instruction. Generation stops
at EOS, the chat template's end-of-turn token, a stop string, or max_tokens (finish_reason "stop" or "length").
Requests that arrive together are decoded together: one left-padded batch (up to --batch_size rows) and one
key-value cache, each row with its own sampling settings and stops, so a slow request does not hold the others
(it joins the next batch). A bad request gets an OpenAI-style JSON error with a 4xx status, never a crash.
Built on FastAPI and uvicorn. For throughput on GPUs, serve a merged model or the adapter with vLLM (README.md).
"""
import argparse
import asyncio
import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import exit_on_user_error  # noqa: E402
from common.data import DataError, Record  # noqa: E402
from common.inference import (  # noqa: E402
    add_model_arguments,
    encode_prompt,
    generation_prompt,
    load_from_args,
    stop_token_ids,
)
from common.logs import quiet_third_party_logs  # noqa: E402

PAGE = Path(__file__).with_name("serve_page.html")
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the server refuses: its message goes back as an OpenAI-style error with a 400 status."""


@dataclass
class Job:
    """One chat completion: its prompt, sampling settings, and where its text goes: ("text", piece) ... then
    ("done", finish_reason, usage) or ("error", message), handed from the decoder thread to the request's event loop."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    events: asyncio.Queue | None = None  # read by the HTTP handler
    loop: asyncio.AbstractEventLoop | None = None  # the handler's loop: the only thread that may touch events

    def emit(self, item: tuple):
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def parse_request(body, tokenizer, prompt_template: str, max_seq_len: int) -> Job:
    """A Job from the JSON body of /v1/chat/completions, or a RequestError saying which field is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 256))
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    stop = body.get("stop") or []
    stops = [stop] if isinstance(stop, str) else stop
    seed = body.get("seed")
    checks = [(isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1,
               "'max_tokens' must be an integer >= 1"),
              (isinstance(temperature, (int, float)) and 0 <= temperature <= 2, "'temperature' must be in [0, 2]"),
              (isinstance(top_p, (int, float)) and 0 < top_p <= 1, "'top_p' must be in (0, 1]"),
              (isinstance(stops, list) and len(stops) <= 4 and all(isinstance(s, str) and s for s in stops),
               "'stop' must be a string or a list of at most 4 non-empty strings"),
              (seed is None or isinstance(seed, int), "'seed' must be an integer"),
              (body.get("n", 1) == 1, "only n=1 is supported")]
    for ok, message in checks:
        if not ok:
            raise RequestError(message)
    try:
        if prompt_template == "chat":
            record = Record({"messages": messages}, "the request")  # a final assistant message: left out
        else:  # alpaca: the last user message is the instruction
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise RequestError("alpaca prompts need a user message")
            record = Record({"instruction": users[-1]}, "the request")
        text, add_special = generation_prompt(record, tokenizer, prompt_template)
    except DataError as e:
        raise RequestError(str(e)) from None
    prompt_ids = encode_prompt(tokenizer, text, add_special)
    if len(prompt_ids) + max_tokens > max_seq_len:
        raise RequestError(f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) exceed the server's "
                           f"--max_seq_len {max_seq_len}")
    return Job(prompt_ids, max_tokens, float(temperature), float(top_p), stops, seed)


# ---------------------------------------------------------------------------------------------------------------
# The decoder: one thread, batches of the jobs waiting, one key-value cache per batch


def pick_tokens(logits, jobs: list[Job], generators: list):
    """The next token of each row: greedy at temperature 0, else sampled from the top_p nucleus at its temperature."""
    import torch

    picked = []
    for row, job in enumerate(jobs):
        if job.temperature == 0:
            picked.append(int(logits[row].argmax()))
            continue
        probs = torch.softmax(logits[row].float() / job.temperature, -1)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < job.top_p  # the smallest set reaching top_p
        nucleus = sorted_probs * keep
        choice = torch.multinomial(nucleus / nucleus.sum(), 1, generator=generators[row])
        picked.append(int(order[choice]))
    return picked


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of text must wait: an incomplete multi-byte character (decoded as U+FFFD until
    its last token comes), or the longest ending that is the start of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


def decode_batch(model, tokenizer, jobs: list[Job], stop_ids: set[int]):
    """Generate for jobs together: left-padded prompts, then one token per row per step from a shared cache, each
    row streaming its text to its queue and stopping on its own."""
    import torch
    from transformers import DynamicCache

    from common.data import collate_left_padded

    device = model.get_input_embeddings().weight.device
    batch = collate_left_padded([{"input_ids": job.prompt_ids} for job in jobs], tokenizer.pad_token_id)
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = batch["position_ids"].to(device)
    generators = []
    for job in jobs:
        generator = torch.Generator(device=device)
        generator.manual_seed(job.seed if job.seed is not None else int(time.time_ns() % 2**31))
        generators.append(generator)
    cache = DynamicCache()
    generated = [[] for _ in jobs]
    texts = [""] * len(jobs)
    finished = [None] * len(jobs)
    with torch.no_grad():
        for _ in range(max(job.max_tokens for job in jobs)):
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
            tokens = pick_tokens(logits, jobs, generators)
            for row, (job, token) in enumerate(zip(jobs, tokens)):
                if finished[row]:
                    continue
                if token in stop_ids:
                    finished[row] = "stop"
                    continue
                generated[row].append(token)
                text = tokenizer.decode(generated[row], skip_special_tokens=True)
                cut = min((text.find(s) for s in job.stops if s in text), default=-1)
                if cut >= 0:
                    text, finished[row] = text[:cut], "stop"
                if not finished[row] and len(generated[row]) >= job.max_tokens:
                    finished[row] = "length"
                # held back: a character still incomplete, and an ending that may grow into a stop string
                ready = len(text) if finished[row] else len(text) - held_back(text, job.stops)
                if ready > len(texts[row]):
                    job.emit(("text", text[len(texts[row]):ready]))
                    texts[row] = text[:ready]
            if all(finished):
                break
            input_ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            positions = positions[:, -1:] + 1
    for row, job in enumerate(jobs):
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(generated[row]),
                 "total_tokens": len(job.prompt_ids) + len(generated[row])}
        job.emit(("done", finished[row] or "length", usage))


def decoder_loop(model, tokenizer, waiting: queue.Queue, batch_size: int, gather_seconds: float):
    """Forever: take the jobs that are waiting (up to batch_size, after a short wait for more to arrive) and decode
    them as one batch; an error fails that batch's requests, not the server."""
    stop_ids = set(stop_token_ids(tokenizer))
    while True:
        jobs = [waiting.get()]
        deadline = time.monotonic() + gather_seconds
        while len(jobs) < batch_size:
            try:
                jobs.append(waiting.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                break
        try:
            decode_batch(model, tokenizer, jobs, stop_ids)
        except Exception as e:  # a failed batch answers its requests with the error and the server goes on
            for job in jobs:
                job.emit(("error", f"{type(e).__name__}: {e}"))


# ---------------------------------------------------------------------------------------------------------------
# The HTTP side


def error_response(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


async def next_event(job: Job):
    """The next item the decoder emitted for a job (no thread waits: the loop is woken when it comes)."""
    return await job.events.get()


def make_app(model_name: str, tokenizer, waiting: queue.Queue, prompt_template: str, max_seq_len: int):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, StreamingResponse

    app = FastAPI(title="llama-train-recipes serve")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error_response(400, str(exc))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", model_name)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llama-train-recipes"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
            job = parse_request(body, tokenizer, prompt_template, max_seq_len)
        except json.JSONDecodeError as e:
            return error_response(400, f"the body is not JSON: {e}")
        except RequestError as e:
            return error_response(400, str(e))
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        waiting.put(job)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": completion_id, "created": created, "model": model_name}
        if body.get("stream"):
            return StreamingResponse(stream_events(job, head), media_type="text/event-stream")
        text = []
        while True:
            event = await next_event(job)
            if event[0] == "text":
                text.append(event[1])
            elif event[0] == "error":
                return error_response(500, event[1], "server_error")
            else:
                finish_reason, usage = event[1], event[2]
                break
        message = {"role": "assistant", "content": "".join(text)}
        return {**head, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}

    return app


async def stream_events(job: Job, head: dict):
    """Server-sent events as OpenAI streams them: a role delta, content deltas, a finish_reason, then [DONE]."""
    def event(delta: dict, finish_reason=None) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    while True:
        item = await next_event(job)
        if item[0] == "text":
            yield event({"content": item[1]})
        elif item[0] == "error":
            yield f"data: {json.dumps({'error': {'message': item[1], 'type': 'server_error'}})}\n\n"
            break
        else:
            yield event({}, item[1])
            break
    yield "data: [DONE]\n\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)  # --model, --adapter, --load_in_4bit, --dtype, --device_map, --max_memory_per_gpu
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "chat"),
                   help="the template the model was trained with (the sft recipes' --prompt_template)")
    p.add_argument("--name", default="", help="the model id the API reports (default: the adapter or model folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch_size", type=int, default=8, help="requests decoded together at most (default %(default)s)")
    p.add_argument("--gather_ms", type=float, default=20, help="wait this long for more requests to batch")
    p.add_argument("--max_seq_len", type=int, default=4096, help="prompt + max_tokens at most (default %(default)s)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_seq_len < 2 or args.gather_ms < 0:
        p.error("--batch_size >= 1, --max_seq_len >= 2 and --gather_ms >= 0")
    quiet_third_party_logs()
    import uvicorn

    with exit_on_user_error():
        model, tokenizer, model_dir, adapter_dir = load_from_args(args)
    name = args.name or Path(adapter_dir or model_dir).name
    waiting = queue.Queue()
    worker = threading.Thread(target=decoder_loop, args=(model, tokenizer, waiting, args.batch_size,
                                                         args.gather_ms / 1000), daemon=True)
    worker.start()
    app = make_app(name, tokenizer, waiting, args.prompt_template, args.max_seq_len)
    print(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
