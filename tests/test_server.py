"""`spac-gguf serve` for real: the server process on a free localhost port with a test pair, talked to
with the official `openai` client and raw HTTP. The oracle for every answer is the target alone
decoding greedily in this process (speculation is lossless, so the server must say exactly that)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from spac_gguf.testing import models as testmodels
from spac_gguf.chat import ChatError, ChatTemplate
from spac_gguf.pair import load

CTX = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(target, draft, port, *extra):
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "spac_gguf.cli", "serve", "-m", str(target), "-md", str(draft),
                             "--port", str(port), "-c", str(CTX), "-t", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 60:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


@pytest.fixture(scope="module")
def pair_files():
    return testmodels.make_pair(arch="qwen3moe", quant="Q8_0")


@pytest.fixture(scope="module")
def server(pair_files):
    proc, url = _start(*pair_files, _free_port())
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def solo(pair_files):
    """Greedy text of the target alone for a prompt (and max tokens)."""
    p = load(pair_files[0], None, n_ctx=CTX, n_threads=2)
    cache = {}

    def run(prompt: str, n: int) -> str:
        if (prompt, n) not in cache:
            cache[(prompt, n)] = "".join(t.text for t in p.generate(prompt, max_tokens=n, draft_max=0))
        return cache[(prompt, n)]
    run.pair = p
    yield run
    p.close()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="none")


def test_health_models_and_metrics(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    models = httpx.get(server + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["qwen3moe-target"]
    httpx.post(server + "/v1/completions", json={"prompt": "metrics", "max_tokens": 3, "temperature": 0})
    text = httpx.get(server + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values["spac_requests_total"] >= 1 and values["spac_tokens_generated_total"] >= 3


def test_completion_equals_the_target_alone(client, solo):
    prompt = "The capital of France is"
    r = client.completions.create(model="qwen3moe-target", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == solo(prompt, 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    parts = [c.choices[0].text for c in client.completions.create(model="qwen3moe-target", prompt=prompt,
                                                                   max_tokens=12, temperature=0, stream=True)]
    assert "".join(parts) == solo(prompt, 12)
    assert len([p for p in parts if p]) > 1                     # it did stream


def test_chat_equals_the_target_alone_on_the_rendered_template(client, solo):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    m = solo.pair.target
    prompt = ChatTemplate(m.chat_template(), **m.special_tokens()).render(msgs)
    r = client.chat.completions.create(model="qwen3moe-target", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == solo(prompt, 10)
    chunks = list(client.chat.completions.create(model="qwen3moe-target", messages=msgs, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == solo(prompt, 10)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text(client, solo):
    prompt = "Once upon a time"
    full = solo(prompt, 16)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and full.find(stop) >= 0
    r = client.completions.create(model="qwen3moe-target", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="qwen3moe-target", prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == full[:full.find(stop)]


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, None),
    (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), 404, "model_not_found"),
    (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400, None),
    (json.dumps({"prompt": "hi", "temperature": 7}).encode(), 400, None),
    (json.dumps({"prompt": "word " * 2000, "max_tokens": 4}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"max_tokens": 4}).encode(), 400, None),
    (json.dumps({"prompt": ["a", "b"]}).encode(), 400, None),
    (json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, None),
    (json.dumps({"prompt": "hi", "n": 3}).encode(), 400, None),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, code):
    r = httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    if code:
        assert err["code"] == code


def test_bad_chat_requests_get_openai_errors(server):
    for body in ({"messages": [{"role": "wizard", "content": "x"}]}, {"messages": []},
                 {"messages": [{"role": "user"}]}):
        r = httpx.post(server + "/v1/chat/completions", json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_each_get_their_own_answer(server, solo):
    prompts = [f"Story number {i}:" for i in range(8)]
    out: dict[int, str] = {}

    def ask(i):
        r = httpx.post(server + "/v1/completions", json={"prompt": prompts[i], "max_tokens": 10, "temperature": 0},
                       timeout=120)
        out[i] = r.json()["choices"][0]["text"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {i: solo(p, 10) for i, p in enumerate(prompts)}


def _metric(server, name):
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_a_client_that_goes_away_frees_the_model(server, solo):
    before = _metric(server, "spac_requests_cancelled_total")
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={"prompt": "Count forever:", "max_tokens": CTX, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break                                            # one chunk, then hang up
    t0 = time.time()
    while _metric(server, "spac_requests_cancelled_total") <= before and time.time() - t0 < 20:
        time.sleep(0.1)
    assert _metric(server, "spac_requests_cancelled_total") > before
    r = httpx.post(server + "/v1/completions", json={"prompt": "After", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.json()["choices"][0]["text"] == solo("After", 4)


def test_ctrl_c_stops_the_server_with_130_and_a_busy_port_is_one_line(pair_files):
    port = _free_port()
    proc, url = _start(*pair_files, port)
    try:
        busy = subprocess.run([sys.executable, "-m", "spac_gguf.cli", "serve", "-m", str(pair_files[0]),
                               "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2
        assert busy.stderr.count("\n") == 1 and "cannot listen" in busy.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    assert rc == 130
    assert "Traceback" not in proc.stderr.read()


def test_chat_template_renders_chatml_without_one():
    t = ChatTemplate(None)
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ChatError):
        t.render([{"role": "robot", "content": "hi"}])
