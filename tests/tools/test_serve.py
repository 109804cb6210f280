"""tools/serve.py on the tiny model, as a server on localhost driven by the official openai client: greedy answers
equal tools/generate.py's (alone, streamed, and twelve at once), stop strings and max_tokens end an answer
with the right finish_reason, bad requests get a 4xx JSON error and the server keeps serving, /v1/models names the
model, and / serves the chat page wired to the same endpoint."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.data import Record
from common.inference import encode_prompt, generate_texts, generation_prompt, make_generation_config
from common.model import load_model, load_tokenizer, resolve_model_path
from tests.conftest import REPO

openai = pytest.importorskip("openai")
PROMPTS = ["Name the capital of France.", "Reverse the letters: a b c", "What is 2 + 3?", "Say hello.",
           "Write a word.", "Count to three."]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--model=tiny", f"--port={port}",
                             "--name=tiny-test", "--gather_ms=200"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected() -> dict:
    """tools/generate.py's greedy answer to each prompt (its rendering, batching and stops), one at a time."""
    folder = resolve_model_path("tiny")
    tokenizer, model = load_tokenizer(folder), load_model(folder).eval()
    config = make_generation_config(model, tokenizer, MAX_TOKENS)
    answers = {}
    for prompt in PROMPTS:
        text, add_special = generation_prompt(Record({"instruction": prompt}, "test"), tokenizer)
        (answers[prompt],) = generate_texts(model, tokenizer, [encode_prompt(tokenizer, text, add_special)], 1, config)
    return answers


def ask(client, prompt, **settings):
    settings = {"temperature": 0, "max_tokens": MAX_TOKENS, **settings}
    return client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": prompt}],
                                          **settings)


def test_greedy_answer_is_generate_s(client, expected):
    response = ask(client, PROMPTS[0])
    choice = response.choices[0]
    assert choice.message.content == expected[PROMPTS[0]] and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and response.usage.completion_tokens <= MAX_TOKENS
    assert response.model == "tiny-test" and response.object == "chat.completion"


def test_streamed_pieces_join_to_the_same_answer(client, expected):
    chunks = list(ask(client, PROMPTS[1], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected[PROMPTS[1]]
    assert len(chunks) > 3 and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def answer(client, prompt: str, stream: bool) -> str:
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in ask(client, prompt, stream=True))
    return ask(client, prompt).choices[0].message.content


def test_twelve_requests_at_once_are_answered_as_each_alone(client, expected):
    """Twelve at once, half streamed: more than one batch (--batch_size 8), every answer its own."""
    requests = [(prompt, stream) for stream in (False, True) for prompt in PROMPTS]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda request: answer(client, *request), requests))
    assert answers == [expected[prompt] for prompt, _ in requests]


def test_stop_string_and_max_tokens_end_the_answer(client, expected):
    full = expected[PROMPTS[2]]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    stopped = ask(client, PROMPTS[2], stop=[stop]).choices[0]
    assert stopped.message.content == full[:full.index(stop)] and stopped.finish_reason == "stop"
    short = ask(client, PROMPTS[2], max_tokens=2)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def test_sampling_with_a_seed_repeats(client):
    first = ask(client, PROMPTS[3], temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    again = ask(client, PROMPTS[3], temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert first == again


@pytest.mark.parametrize("body, message", [
    ({"model": "m"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "'max_tokens' must be an integer >= 1"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "'temperature' must be in [0, 2]"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "exceed the server's --max_seq_len"),
    ("not json", "the body is not JSON"),
])
def test_bad_requests_get_a_400_json_error_and_the_server_goes_on(server, client, expected, body, message):
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(f"{server}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 400
    assert message in json.loads(error.value.read())["error"]["message"]
    assert ask(client, PROMPTS[0]).choices[0].message.content == expected[PROMPTS[0]]


def test_models_and_the_chat_page(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    page = urllib.request.urlopen(f"{server}/", timeout=30).read().decode()
    assert "<title>tiny-test - chat</title>" in page and 'fetch("/v1/chat/completions"' in page
    assert "stream: true" in page


def test_pick_tokens_is_greedy_at_temperature_zero():
    from tests.tools.conftest import load_tool

    serve = load_tool("serve")
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]])
    jobs = [serve.Job([1], 4, 0.0, 1.0, [], None), serve.Job([1], 4, 1.0, 1e-6, [], 0)]
    generators = [torch.Generator().manual_seed(0) for _ in jobs]
    assert serve.pick_tokens(logits, jobs, generators) == [1, 0]  # top_p near 0: the likeliest token only


def chromium_path():
    """A headless Chromium for the page check: $LLAMA_RECIPES_CHROMIUM, or what bench/install_chromium.sh unpacked."""
    from common.model import cache_dir

    given = os.environ.get("LLAMA_RECIPES_CHROMIUM") or str(cache_dir() / "chromium" / "chromium")
    return given if os.path.isfile(given) else None


@pytest.mark.skipif(chromium_path() is None, reason="no headless Chromium here (bash bench/install_chromium.sh)")
def test_the_chat_page_in_headless_chromium(server, expected, tmp_path):
    """The page in a real browser: a message typed and sent with Enter streams back generate.py's greedy answer;
    the screenshot is written beside the test's files and its path printed."""
    sync_api = pytest.importorskip("playwright.sync_api")
    args = ["--no-sandbox", "--no-zygote", "--single-process", "--use-gl=angle", "--use-angle=swiftshader"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=args, headless=True)
        page = browser.new_page(viewport={"width": 900, "height": 600})
        page.goto(f"{server}/")
        page.fill("#max_tokens", str(MAX_TOKENS))
        page.fill("#input", PROMPTS[0])
        page.press("#input", "Enter")
        page.wait_for_selector('.assistant[data-done="true"]', timeout=60_000)
        shown = page.inner_text(".assistant")
        screenshot = tmp_path / "chat_page.png"
        page.screenshot(path=str(screenshot))
        browser.close()
    print(f"chat page screenshot: {screenshot}")
    assert shown.strip() == expected[PROMPTS[0]].strip()
    assert screenshot.stat().st_size > 5_000
