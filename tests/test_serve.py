"""The web UI: the API (streamed text equals the non-streamed result, bad input gets 400 naming the
field, big bodies 413, 20 concurrent requests all complete, a disconnect stops generation) and
the page itself in headless Chromium (type, generate, watch the text grow, stop, screenshot)."""

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from codegpt.base.model import GPT, GPTConfig
from codegpt.base.generate import Sampling, generate
from codegpt.base.tokenizer import Tokenizer
from codegpt.serve.app import Limits, create_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)  # varied text, so that equal outputs mean something
    return model


def make_app(model, **limits):
    info = {"model": "tiny test model", "parameters": model.num_params(), "adapter": None, "device": "cpu"}
    return create_app(model, Tokenizer(), info, Limits(**limits))


@pytest.fixture(scope="module")
def client(model):
    from starlette.testclient import TestClient

    with TestClient(make_app(model)) as c:
        yield c


class Server:
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def sse_text(body: str) -> str:
    return "".join(json.loads(line[6:])["text"] for line in body.splitlines()
                   if line.startswith("data: ") and '"text"' in line)


def test_health_info_and_presets(client):
    assert client.get("/health").json() == {"status": "ok", "slots_idle": 8, "slots_processing": 0, "queued": 0}
    info = client.get("/info").json()
    assert info["tokenizer"] == "cl100k_base" and info["block_size"] == 256 and info["limits"]["max_new_tokens"] == 512
    assert info["slots"] == 8 and info["models"] == [{"name": "base", "adapter": 0, "fim": False, "parent": None}]
    assert info["graph_capture_s"] is None  # a CPU decodes eagerly
    presets = client.get("/presets").json()
    assert set(presets) == {"free", "docstring", "bugfix", "infill"}
    assert presets["infill"]["prompt"].count("<FILL-HERE>") == 1
    assert presets["bugfix"]["prompt"].startswith("# The function below has one bug.")
    assert "<textarea" in client.get("/").text


def test_streamed_text_equals_the_non_streamed_result(client):
    request = {"prompt": "def parse(text):\n", "max_new_tokens": 40, "temperature": 0}
    whole = client.post("/generate", json=request).json()
    streamed = client.post("/generate", json={**request, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in streamed.text
    assert sse_text(streamed.text) == whole["text"] and len(whole["text"]) > 10


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_new_tokens": 100000}, "max_new_tokens"),
    ({"prompt": "x", "top_k": 0}, "top_k"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "temprature": 0.5}, "temprature"),
    ({"max_new_tokens": 5}, "prompt"),
    ({"prompt": "word " * 800}, "prompt"),
])
def test_bad_values_get_400_naming_the_field(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 400
    assert response.json()["field"] == field and response.json()["error"].startswith(field)


def test_bad_json_and_big_bodies(client):
    response = client.post("/generate", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"].startswith("invalid JSON")
    big = client.post("/generate", json={"prompt": "x" * 100_000})
    assert big.status_code == 413 and "exceeds" in big.json()["error"]


def test_twenty_concurrent_requests_all_complete(model):
    with Server(make_app(model)) as url:
        def one(i):
            body = {"prompt": f"def f{i}(x):\n", "max_new_tokens": 24, "temperature": 0.7, "seed": i, "stream": i % 2 == 0}
            response = httpx.post(f"{url}/generate", json=body, timeout=120)
            return response.status_code, (sse_text(response.text) if body["stream"] else response.json()["text"])

        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(one, range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert all(text for _, text in results)


def count_and_slow_down_decoding(model, steps: list):
    """A hook on the token embedding, which every decoding step runs once (generation never calls
    the model's forward, so a hook there sees nothing): counts steps, 10 ms each."""

    def hook(*_):
        steps.append(1)
        time.sleep(0.01)

    return model.transformer.wte.register_forward_hook(hook)


def test_a_client_that_disconnects_stops_its_generation(model):
    steps = []
    hook = count_and_slow_down_decoding(model, steps)
    try:
        with Server(make_app(model)) as url:
            body = {"prompt": "def f():\n", "max_new_tokens": 500, "temperature": 0.8, "stream": True}
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        break  # the first piece has arrived; hang up
            time.sleep(1.0)
            after_disconnect = len(steps)
            time.sleep(0.5)
            assert len(steps) == after_disconnect < 500  # generation stopped early, and stays stopped
            assert httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 3}, timeout=60).status_code == 200
    finally:
        hook.remove()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_page_in_headless_chromium(model, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    hook = model.register_forward_hook(lambda *_: time.sleep(0.02))  # slow enough to watch the text grow
    try:
        with Server(make_app(model)) as url, playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url)
            page.wait_for_function("document.getElementById('info').textContent.includes('tiny test model')")
            page.click("button[data-preset=docstring]")
            assert page.input_value("#prompt").startswith("def is_palindrome")
            page.fill("#prompt", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
            page.fill("#stop_strings", "")
            page.fill("#max_new_tokens", "400")
            page.click("#generate")
            lengths = []
            for _ in range(50):
                lengths.append(len(page.text_content("#output .generated")))
                if len(set(lengths)) >= 3:
                    break
                page.wait_for_timeout(100)
            assert len(set(lengths)) >= 3 and lengths == sorted(lengths)  # streamed text grows
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
            stopped = page.text_content("#output .generated")
            page.wait_for_timeout(300)
            assert page.text_content("#output .generated") == stopped and len(stopped) > 0
            # Fill in the middle: the preset marks the hole; the middle lands between prefix and suffix.
            page.click("button[data-preset=infill]")
            assert page.is_checked("#infill")
            prefix, suffix = page.input_value("#prompt").split("<FILL-HERE>")
            page.fill("#max_new_tokens", "5")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
            assert page.text_content("#output .prompt") == prefix and page.text_content("#output .suffix") == suffix
            assert "not trained for fill-in-the-middle" in page.text_content("#status")
            page.fill("#prompt", "a <FILL-HERE> b <FILL-HERE>")
            page.click("#generate")
            assert "more than once" in page.text_content("#status")
            page.screenshot(path=str(tmp_path / "serve.png"))
            assert (tmp_path / "serve.png").stat().st_size > 10_000
            browser.close()
    finally:
        hook.remove()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body,field", [({"seed": 2**70}, "seed"), ({"seed": -1}, "seed"),
                                        ({"temperature": 1e-40}, "temperature")])
def test_values_that_would_fail_in_generation_get_400_before_it(client, body, field, stream):
    response = client.post("/generate", json={"prompt": "x", "max_new_tokens": 3, "stream": stream, **body})
    assert response.status_code == 400 and response.json()["field"] == field, response.text
    assert response.json()["error"].startswith(f"{field}: ")


def test_a_chunked_body_over_the_limit_gets_413(model):
    with Server(make_app(model)) as url:
        def chunks():  # no Content-Length: the server can only count
            yield b'{"prompt": "'
            for _ in range(80):
                yield b"x" * 1024
            yield b'"}'

        response = httpx.post(f"{url}/generate", content=chunks(), headers={"content-type": "application/json"},
                              timeout=60)
    assert response.status_code == 413 and "exceeds" in response.json()["error"]


def test_a_non_streaming_client_that_gives_up_stops_its_generation(model):
    steps = []
    hook = count_and_slow_down_decoding(model, steps)
    try:
        with Server(make_app(model)) as url:
            body = {"prompt": "def f():\n", "max_new_tokens": 500, "temperature": 0.8}
            for _ in range(3):  # each gives up after 0.3 s (5 s of decoding); the queued ones never start
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}/generate", json=body, timeout=0.3)
            time.sleep(1.0)
            after_disconnect = len(steps)
            time.sleep(0.5)
            assert len(steps) == after_disconnect < 200  # generation stopped early, and stays stopped
            assert httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 3}, timeout=60).status_code == 200
            assert len(steps) - after_disconnect <= 3  # no abandoned generation ran ahead of it
    finally:
        hook.remove()


def test_a_suffix_fills_the_hole_and_says_when_the_model_was_not_trained_for_it(client, model):
    body = {"prompt": "def add(a, b):\n", "suffix": "\n\nprint(add(1, 2))\n", "max_new_tokens": 12, "temperature": 0}
    plain = client.post("/generate", json=body).json()
    expected = generate(model, Tokenizer(), [body["prompt"]], Sampling(12, 0.0), [body["suffix"]])[0]
    assert plain["text"] == expected and "not trained for fill-in-the-middle" in plain["warning"]
    streamed = client.post("/generate", json={**body, "stream": True}).text
    assert streamed.startswith("event: warning") and sse_text(streamed) == expected
    assert "warning" not in client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).json()
    assert client.get("/info").json()["fim"] is False


def test_a_request_the_model_cannot_run_fails_alone(model):
    """A prompt with ids past a small model's vocabulary fails in the decoding thread: that request
    gets 500 in the API's format, and a request beside it, and the next, are answered."""
    torch.manual_seed(0)
    small = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).eval()
    with Server(make_app(small)) as url:
        with ThreadPoolExecutor(max_workers=2) as pool:
            bad = pool.submit(httpx.post, f"{url}/generate", json={"prompt": "zebra quokka", "max_new_tokens": 5},
                              timeout=60)
            good = pool.submit(httpx.post, f"{url}/generate", json={"prompt": "a = 1", "max_new_tokens": 20},
                               timeout=60)
        assert bad.result().status_code == 500 and "failed" in bad.result().json()["error"]
        assert good.result().status_code == 200
        assert httpx.post(f"{url}/generate", json={"prompt": "a", "max_new_tokens": 3}, timeout=60).status_code == 200
