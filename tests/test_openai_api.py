"""The OpenAI completions API, driven by the official `openai` client against a real server on a
port: the models listed, plain, streamed, infilled, n > 1, stop strings, each answer equal to what
`generate` gives for the same model (a base and two adapters served at once), eight concurrent
requests mixing the models equal to each alone, and errors as the client's own exceptions
(unknown model, bad field, full queue). Bodies the JSON parser cannot take get 400 in each API's
own error format; `codegpt serve` refuses a port in use and an adapter of another base in one line."""

import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from codegpt.base.checkpoint import save_model
from codegpt.base.convert import load_any
from codegpt.base.generate import generate
from codegpt.base.model import GPT
from codegpt.base.sampling import Sampling
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import load_for_inference
from codegpt.finetune.lora import LoRAConfig
from codegpt.finetune.multi_lora import attach_adapters
from codegpt.serve.app import create_app
from codegpt.serve.serving import Limits, ServedModel
from tests.helpers import tiny_config, varied_model, write_adapter
from tests.test_serve import CHROMIUM, Server, count_and_slow_down_decoding

openai = pytest.importorskip("openai")

PROMPT = "def parse(text):\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny base (a real vocabulary, weights far from init so that text varies) and two adapters."""
    w = tmp_path_factory.mktemp("served")
    base = varied_model(block_size=128)
    save_model(w / "base", base)
    docstring = write_adapter(w / "docstring", base, w / "base", LoRAConfig(r=4, targets=["c_attn", "c_fc"]), seed=1)
    bugfix = write_adapter(w / "bugfix", base, w / "base", LoRAConfig(r=8, targets=["c_proj"]), seed=2)
    return {"tiny": (w / "base", None), "docstring": (w / "base", docstring), "bugfix": (w / "base", bugfix)}


def served_app(checkpoints, slots=8, **limits):
    base_dir = checkpoints["tiny"][0]
    model = load_any(base_dir)
    row_adapters, _ = attach_adapters(model, [checkpoints["docstring"][1], checkpoints["bugfix"][1]])
    adapters = [ServedModel("docstring", 1, False, "tiny"), ServedModel("bugfix", 2, False, "tiny")]
    info = {"model": "tiny test model", "parameters": model.num_params(), "device": "cpu"}
    return model, create_app(model, Tokenizer(), info, Limits(**limits), name="tiny", adapters=adapters,
                             row_adapters=row_adapters, slots=slots)


@pytest.fixture(scope="module")
def server(checkpoints):
    with Server(served_app(checkpoints)[1]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def alone(checkpoints, tokenizer):
    """What `generate` gives for a served model, loaded on its own (an adapter unmerged)."""
    models = {name: load_for_inference(*paths)[0] for name, paths in checkpoints.items()}

    def run(name, prompt, sampling, suffix=None):
        return generate(models[name], tokenizer, [prompt], sampling, [suffix])[0]

    return run


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_offers_the_adapters_and_decodes_with_the_one_chosen(server, alone):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(server)
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == \
            ["tiny", "docstring", "bugfix"]
        page.select_option("#model", "bugfix")
        page.click("button[data-preset=free]")
        page.fill("#prompt", PROMPT)
        page.fill("#temperature", "0")
        page.fill("#max_new_tokens", "12")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        assert page.text_content("#output .generated") == alone("bugfix", PROMPT, Sampling(12, temperature=0))
        browser.close()


def test_the_models_are_the_base_and_every_adapter(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "docstring", "bugfix"]
    assert [getattr(m, "parent", None) for m in models] == [None, "tiny", "tiny"]


@pytest.mark.parametrize("name", ["tiny", "docstring", "bugfix"])
def test_a_completion_equals_generate_for_its_model(client, alone, tokenizer, name):
    completion = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == name and choice.index == 0
    assert choice.text == alone(name, PROMPT, Sampling(24, temperature=0)) and len(choice.text) > 10
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    if choice.finish_reason == "length":
        assert completion.usage.completion_tokens == 24
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_each_name_picks_its_own_weights(client):
    texts = {client.completions.create(model=m, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
             for m in ("tiny", "docstring", "bugfix")}
    assert len(texts) == 3


def test_streamed_chunks_join_to_the_plain_completion(client):
    plain = client.completions.create(model="docstring", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="docstring", prompt=PROMPT, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2 and "".join(texts) == plain.choices[0].text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_a_suffix_fills_the_hole_as_generate_does(client, alone):
    prompt, suffix = "def add(a, b):\n", "\n\nprint(add(1, 2))\n"
    completion = client.completions.create(model="tiny", prompt=prompt, suffix=suffix, max_tokens=12, temperature=0)
    assert completion.choices[0].text == alone("tiny", prompt, Sampling(12, temperature=0), suffix)


def test_n_samples_per_prompt_each_seeded_as_generate_seeds_them(client, alone):
    completion = client.completions.create(model="bugfix", prompt=["x = ", "import "], n=3, max_tokens=10,
                                           temperature=1.0, seed=5)
    assert [c.index for c in completion.choices] == list(range(6))
    texts = [c.text for c in completion.choices]
    assert len(set(texts[:3])) > 1  # the samples of one prompt differ
    for i, prompt in enumerate(["x = ", "import "]):
        for j in range(3):
            assert texts[i * 3 + j] == alone("bugfix", prompt, Sampling(10, temperature=1.0, seed=5 + j))


def test_a_stop_string_ends_the_text_before_it(client, alone):
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop = free[15:18]
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop)
    assert completion.choices[0].text == free[: free.index(stop)] == alone("tiny", PROMPT, Sampling(40, 0, stop=[stop]))
    assert completion.choices[0].finish_reason == "stop"


def test_eight_concurrent_requests_mixing_models_equal_each_alone(client, alone):
    prompts = ["def f(x):", "import sys\n", "class A:", "for i in", "x = [", "# sum\n", "while n:", "return "]
    names = ["tiny", "docstring", "bugfix"]

    def one(i):
        return client.completions.create(model=names[i % 3], prompt=prompts[i], max_tokens=20 + 3 * i,
                                         temperature=0, stream=i % 2 == 0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    for i, result in enumerate(results):
        text = "".join(c.choices[0].text for c in result if c.choices) if i % 2 == 0 else result.choices[0].text
        assert text == alone(names[i % 3], prompts[i], Sampling(20 + 3 * i, temperature=0)), i


def test_an_unknown_model_is_the_clients_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert raised.value.status_code == 404 and raised.value.param == "model" and raised.value.code == "model_not_found"
    assert "gpt-4" in raised.value.message


@pytest.mark.parametrize("arguments,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"seed": 2**70}, "seed"),
    ({"temperature": 1e-40}, "temperature"),
    ({"stop": [""]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "word " * 800}, "prompt"),
    ({"logprobs": 2}, "logprobs"),
    ({"extra_body": {"temprature": 0.5}}, "temprature"),
])
def test_a_bad_field_is_the_clients_bad_request_error_naming_it(client, arguments, param):
    arguments = {"model": "tiny", "prompt": "x", "max_tokens": 2, **arguments}
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**arguments)
    assert raised.value.status_code == 400 and raised.value.param == param, raised.value.body
    assert raised.value.type == "invalid_request_error"


def test_a_full_queue_is_the_clients_rate_limit_error(checkpoints):
    model, app = served_app(checkpoints, slots=1, max_queue=1)
    steps = []
    hook = count_and_slow_down_decoding(model, steps)  # 10 ms a step: the one row stays busy
    try:
        with Server(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

            def wait_for(key, value):
                deadline = time.time() + 30
                while httpx.get(f"{url}/health").json()[key] != value and time.time() < deadline:
                    time.sleep(0.01)

            running = threading.Thread(target=client.completions.create, kwargs=dict(
                model="tiny", prompt="x", max_tokens=100, temperature=0, extra_body={"min_tokens": 100}))
            running.start()
            wait_for("slots_processing", 1)
            queued = threading.Thread(target=client.completions.create,
                                      kwargs=dict(model="tiny", prompt="y", max_tokens=2))
            queued.start()
            wait_for("queued", 1)
            with pytest.raises(openai.RateLimitError) as raised:
                client.completions.create(model="tiny", prompt="z", max_tokens=2)
            assert raised.value.status_code == 429 and raised.value.code == "rate_limit_exceeded"
            running.join(timeout=60)
            queued.join(timeout=60)
    finally:
        hook.remove()


def test_a_streaming_client_that_leaves_stops_its_sequence(checkpoints):
    model, app = served_app(checkpoints)
    steps = []
    hook = count_and_slow_down_decoding(model, steps)
    try:
        with Server(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            stream = client.completions.create(model="docstring", prompt="def f():\n", max_tokens=500,
                                               temperature=0.8, stream=True, extra_body={"min_tokens": 500})
            next(iter(stream))
            stream.close()
            time.sleep(1.0)
            after = len(steps)
            time.sleep(0.5)
            assert len(steps) == after < 300
            assert httpx.get(f"{url}/health").json()["slots_processing"] == 0
    finally:
        hook.remove()


HOSTILE_BODIES = {
    "30,000 levels deep": b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "a 5,000-digit integer": b'{"model": "tiny", "prompt": "x", "seed": ' + b"7" * 5000 + b"}",
    "not UTF-8": b'{"model": "tiny", "prompt": "\xff\xfe"}',
}


@pytest.mark.parametrize("name", HOSTILE_BODIES)
def test_bodies_the_parser_cannot_take_get_400_in_each_apis_own_format(server, name):
    body = HOSTILE_BODIES[name]
    openai_error = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert openai_error.status_code == 400, openai_error.text
    assert set(openai_error.json()) == {"error"} and set(openai_error.json()["error"]) == {"message", "type", "param",
                                                                                          "code"}
    native = httpx.post(f"{server}/generate", content=body, headers={"content-type": "application/json"})
    assert native.status_code == 400 and native.json()["field"] is None and isinstance(native.json()["error"], str)
    assert "detail" not in native.json()


def test_the_v1_paths_answer_in_openais_format_for_big_bodies_and_unknown_paths(server):
    big = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x" * 100_000})
    assert big.status_code == 413 and "exceeds" in big.json()["error"]["message"]
    missing = httpx.get(f"{server}/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


def serve_main(args, capsys):
    from codegpt.serve.__main__ import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    return exit_info.value.code, err


def test_serve_refuses_a_port_in_use_in_one_line(checkpoints, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = serve_main([checkpoints["tiny"][0], "--port", port], capsys)
    assert code == 2 and err == f"error: --port: 127.0.0.1:{port} is already in use (another server?); " \
                                "choose another port\n"


def test_serve_refuses_an_adapter_of_another_base_naming_its_file(checkpoints, tmp_path, capsys):
    other = GPT(tiny_config(vocab_size=100_352, block_size=128, n_embd=32, n_head=2))
    save_model(tmp_path / "other", other)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = serve_main([tmp_path / "other", "--adapter", f"docstring={checkpoints['docstring'][1]}",
                            "--port", port], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {checkpoints['docstring'][1]}: this adapter was trained on another base")


def test_codegpt_serve_as_a_user_runs_it(checkpoints, alone):
    """The command: the base and an adapter on a port, answered through the client, then SIGTERM
    ends it cleanly."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_dir, adapter = checkpoints["docstring"]
    process = subprocess.Popen([sys.executable, "-m", "codegpt.serve", str(base_dir), "--adapter",
                                f"docstring={adapter}", "--port", str(port), "--slots", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(base_dir), "docstring"]
        text = client.completions.create(model="docstring", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
        assert text == alone("docstring", PROMPT, Sampling(16, temperature=0))
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert out.startswith(f"serving {base_dir}") and "with adapters docstring" in out
