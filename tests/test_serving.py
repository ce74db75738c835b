"""lpenv-serve: the engine on the wall clock behind the OpenAI-compatible API, on the tiny
model. Its tokens are the engine's own greedy tokens; clients that leave free their KV blocks;
bad input is a 400 that queues nothing; a failing iteration ends every stream; /metrics is
Prometheus' format and counts what happened."""

from __future__ import annotations

import json
import pickle
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from engine_adapter.engine import Engine
from engine_adapter.serving import ServingLoop, StreamEnd
from engine_adapter.serving_metrics import Histogram, ServingMetrics
from engine_adapter.text_codec import ByteCodec, HFCodec, text_codec, write_word_tokenizer
from lpenv.config_schema import ServeConfig
from policies import env_configuration
from policies.export import export_handwritten
from policies.fixed import FixedGroups
from scripts.evaluate import CONFIG_DIR, ConfigProblem
from scripts.serve import start
from tests.greedy_outputs import greedy_outputs

MODEL = "qwen3-moe-tiny"
VOCAB = 512


def serve_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("serve", overrides=[f"model={MODEL}", "port=0", "warmup=false",
                                           *overrides])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_word_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB)


@pytest.fixture(scope="module")
def server(tokenizer):
    srv = start(serve_config(f"tokenizer={tokenizer}"))
    yield srv
    srv.stop()


def post(server, path: str, doc, timeout: float = 60.0) -> tuple[int, dict | str]:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    req = urllib.request.Request(server.url + path, body,
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    return status, (text if text.startswith("data:") else json.loads(text))


def get(server, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(server) -> dict[str, float]:
    """``/metrics`` as name{labels} -> value, every line checked against the text format."""
    status, text = get(server, "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) lpenv_\w+ .+", line), line
            continue
        m = re.fullmatch(r'(lpenv_\w+(?:\{\w+="[^"]*"(?:,\w+="[^"]*")*\})?) (\S+)', line)
        assert m, line
        out[m.group(1)] = float(m.group(2))
    return out


def settled(server, timeout: float = 20.0) -> dict[str, float]:
    """The metrics once nothing is running any more (aborts take effect between iterations)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        engine = server.loop.engine
        if (m["lpenv_requests_running"] == 0 and not engine.has_unfinished()) or \
                time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def words(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def events(stream_text: str) -> list:
    out = []
    for block in stream_text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_outputs_are_the_engines_greedy_tokens(server):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 37, 120)]
    got = []
    for i, prompt in enumerate(prompts):
        # token ids, text, and a stream: three ways in, the same tokens out
        if i == 0:
            status, doc = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6})
            text = doc["choices"][0]["text"]
        elif i == 1:
            status, doc = post(server, "/v1/completions",
                               {"prompt": words(prompt), "max_tokens": 6, "model": MODEL})
            text = doc["choices"][0]["text"]
            assert doc["usage"] == {"prompt_tokens": 37, "completion_tokens": 6,
                                    "total_tokens": 43}
        else:
            status, raw = post(server, "/v1/completions", {
                "prompt": prompt, "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}})
            evs = events(raw)
            assert evs[-1] == "[DONE]" and evs[-2]["usage"]["completion_tokens"] == 6
            # (a chunk a token, the last with its finish reason)
            assert [e["choices"][0]["finish_reason"] for e in evs[:-2]] == [None] * 5 + [
                "length"]
            text = "".join(e["choices"][0]["text"] for e in evs[:-2])
        assert status == 200
        got.append(ids_of(text))
    live = server.loop.engine
    offline = Engine(live.config, executor=None, model_config=live.model_config,
                     decide=server.loop.decide)
    for prompt, tokens in zip(prompts, got):  # each alone, as each was served alone
        want, _ = greedy_outputs(offline, [prompt], 6)
        assert tokens == want[0]


def test_concurrent_clients_are_all_served_and_free_their_kv_blocks(server):
    before = settled(server)
    results = []

    def client(i):
        results.append(post(server, "/v1/completions",
                            {"prompt": list(range(1 + i, 40 + 7 * i)), "max_tokens": 5}))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [s for s, _ in results] == [200] * 6
    assert all(d["usage"]["completion_tokens"] == 5 for _, d in results)
    m = settled(server)
    assert m['lpenv_requests_total{outcome="finished"}'] == \
        before['lpenv_requests_total{outcome="finished"}'] + 6
    assert m["lpenv_generation_tokens_total"] == before["lpenv_generation_tokens_total"] + 30
    assert m["lpenv_ttft_seconds_count"] == before["lpenv_ttft_seconds_count"] + 6
    assert m["lpenv_tbt_seconds_count"] == before["lpenv_tbt_seconds_count"] + 6 * 4
    assert m["lpenv_kv_blocks_free"] == m["lpenv_kv_blocks"]
    assert m["lpenv_requests_running"] == m["lpenv_requests_waiting"] == 0
    batches = sum(v for k, v in m.items() if k.startswith("lpenv_prefill_batches_total"))
    assert batches >= 1


def _raw_request(server, doc: dict) -> socket.socket:
    host, port = server.http.server_address[:2]
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps(doc).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "before-any-token"])
def test_a_client_that_leaves_is_aborted_and_its_kv_blocks_freed(server, stream):
    before = settled(server)
    sock = _raw_request(server, {"prompt": list(range(200)), "max_tokens": 400,
                                 "stream": stream})
    if stream:  # read until the first token's event, then hang up
        seen = b""
        while b"data: " not in seen:
            seen += sock.recv(4096)
    else:
        time.sleep(0.05)
    engine = server.loop.engine
    assert engine.has_unfinished()  # (running: it holds KV blocks now)
    sock.close()
    m = settled(server)
    assert m['lpenv_requests_total{outcome="aborted"}'] == \
        before['lpenv_requests_total{outcome="aborted"}'] + 1
    assert m['lpenv_requests_total{outcome="finished"}'] == \
        before['lpenv_requests_total{outcome="finished"}']
    assert m["lpenv_generation_tokens_total"] - before["lpenv_generation_tokens_total"] < 400
    assert m["lpenv_kv_blocks_free"] == m["lpenv_kv_blocks"]
    assert not engine.scheduler.requests and not engine.has_unfinished()


def test_bad_requests_are_400s_that_queue_nothing(server):
    before = settled(server)
    too_long = server.loop.engine.max_model_len
    cases = [
        (b"{not json", "not JSON"),
        ({"prompt": [1, 2], "model": "gpt-4"}, "not served here"),
        ({"prompt": [1, 2], "temperature": 0.7}, "greedy"),
        ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 2], "n": 2}, "n and best_of"),
        ({"prompt": {"a": 1}}, "prompt must be"),
        ({"prompt": [1, 2], "stream": "yes"}, "stream must be"),
        ({"prompt": [1, 2], "stop": ["\n"]}, "stop is not supported"),
        ({"prompt": [1, 2], "logprobs": 3}, "logprobs is not supported"),
        ({"prompt": [1, VOCAB + 5]}, "outside the vocabulary"),  # the engine's own check
        ({"prompt": [1] * too_long, "max_tokens": 1}, "exceeds the model length"),
    ]
    for doc, says in cases:
        status, body = post(server, "/v1/completions", doc)
        assert status == 400, doc
        assert says in body["error"]["message"] and body["error"]["code"] == 400
    m = settled(server)
    # (the engine refused two: counted as rejected; the rest never reached it)
    assert m['lpenv_requests_total{outcome="rejected"}'] == \
        before['lpenv_requests_total{outcome="rejected"}'] + 2
    assert not server.loop.engine.scheduler.requests
    sock = socket.create_connection(server.http.server_address[:2], timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.0 400")
    sock.close()
    assert get(server, "/nope")[0] == 404
    assert post(server, "/v1/chat", {"prompt": [1]})[0] == 404


def test_models_health_tokenize_and_metrics(server):
    status, body = get(server, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == MODEL
    assert get(server, "/health") == (200, '{"status": "ok"}')
    status, doc = post(server, "/tokenize", {"prompt": "t3 t4 t511"})
    assert status == 200 and doc["tokens"] == [3, 4, 511] and doc["count"] == 3
    assert post(server, "/detokenize", {"tokens": [3, 4, 511]}) == (200, {"prompt": "t3 t4 t511"})
    assert post(server, "/tokenize", {"prompt": 5})[0] == 400
    m = metrics(server)
    for name in ("lpenv_ttft_seconds", "lpenv_tbt_seconds", "lpenv_e2e_seconds",
                 "lpenv_iteration_seconds"):
        buckets = [v for k, v in m.items() if k.startswith(name + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[name + "_count"]
    assert m["lpenv_slo_attained_total"] <= m['lpenv_requests_total{outcome="finished"}']
    assert m[f'lpenv_server_info{{model="{MODEL}",policy="paper",mode="layered"}}'] == 1


def test_an_exported_policy_decides_in_the_server(tmp_path, monkeypatch):
    cfg = serve_config()  # (exported for the engine and SLOs it is served with)
    kwargs = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("engine", "slo")}
    path = export_handwritten(FixedGroups(groups=2), env_configuration.env_config(kwargs),
                              tmp_path / "policy")

    def refuse(*a, **k):
        raise AssertionError("the serving path unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    srv = start(serve_config("policy=learned", f"policy.path={path}"))
    try:
        for n in (30, 90):
            assert post(srv, "/v1/completions", {"prompt": list(range(n)),
                                                 "max_tokens": 3})[0] == 200
        m = settled(srv)
    finally:
        srv.stop()
    groups = {k: v for k, v in m.items() if k.startswith("lpenv_prefill_batches_total")}
    assert groups == {'lpenv_prefill_batches_total{layer_groups="2"}': 2}


class _Failing:
    """An executor whose second iteration fails."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        self.device, self.needs_data = inner.device, True

    def execute(self, plan):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("device lost")
        return self.inner.execute(plan)


def test_a_failing_iteration_ends_every_stream_and_health_says_so(server):
    live = server.loop.engine
    engine = Engine(live.config, executor=_Failing(live.executor),
                    model_config=live.model_config)
    loop = ServingLoop(engine, server.loop.decide, ServingMetrics(2.0, 0.125)).start()
    streams = [loop.submit(list(range(20)), 50), loop.submit(list(range(30)), 50)]
    for stream in streams:
        end = None
        for _ in range(60):  # (at most 50 tokens, then the end)
            end = stream.get(10)
            if isinstance(end, StreamEnd):
                break
        assert end.reason == "error" and "device lost" in end.message
    loop.join(10)
    assert not loop.healthy and "device lost" in loop.error
    with pytest.raises(RuntimeError, match="not running"):
        loop.submit([1, 2, 3], 2)


def test_the_server_binds_loopback_by_default_and_refuses_what_it_cannot_serve(tokenizer):
    cfg = serve_config()
    assert cfg.host == ServeConfig.host == "127.0.0.1"
    for override, says in (("backend.name=sim", "real engine"),
                           ("backend.latency=modeled", "real engine"),
                           ("port=70000", "port"),
                           ("tokenizer=/nonexistent", "no tokenizer.json"),
                           ("policy.max_groups=0", "max_groups")):
        with pytest.raises(ConfigProblem, match=says):
            start(serve_config(override))


def test_text_codecs(tokenizer):
    byte = text_codec(None, VOCAB)
    assert isinstance(byte, ByteCodec) and byte.encode("hé") == [104, 195, 169]
    decoder = byte.decoder()
    # (a character split across tokens comes out whole, once its last byte is there)
    assert [decoder.push(t) for t in (104, 195, 169 + 256)] == ["h", "", "é"]
    with pytest.raises(Exception, match="256 or more"):
        ByteCodec(100)
    words_codec = text_codec(str(tokenizer), VOCAB)
    assert isinstance(words_codec, HFCodec)
    ids = [0, 7, 511, 42]
    assert words_codec.encode(words(ids)) == ids
    decoder = words_codec.decoder()
    assert "".join(decoder.push(t) for t in ids).split() == [f"t{i}" for i in ids]
    with pytest.raises(Exception, match="the model only 100"):
        HFCodec(tokenizer, 100)


def test_histogram_buckets_are_le():
    h = Histogram((0.1, 0.2))
    h.observe([0.1, 0.15, 0.2, 0.3, 0.05])
    lines = h.lines("x", "help")
    assert 'x_bucket{le="0.1"} 2' in lines and 'x_bucket{le="0.2"} 4' in lines
    assert 'x_bucket{le="+Inf"} 5' in lines and h.count == 5
    assert abs(h.sum - 0.8) < 1e-12


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_lpenv_serve_serves_until_interrupted(tokenizer, tmp_path, stop):
    """The command as deployed: the loop in the main thread; Ctrl-C (or SIGTERM) stops it
    cleanly."""
    import signal
    import subprocess
    import sys

    from scripts.bench_serve import free_port, wait_until_healthy

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.serve", f"model={MODEL}", f"port={port}",
         f"tokenizer={tokenizer}", f"hydra.run.dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, proc.stdout.read, timeout=120)
        req = urllib.request.Request(url + "/v1/completions",
                                     json.dumps({"prompt": "t1 t2 t3", "max_tokens": 4}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            doc = json.loads(r.read())
        assert len(doc["choices"][0]["text"].split()) == 4
    finally:
        proc.send_signal(getattr(signal, stop))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"serving '{MODEL}' at http://127.0.0.1:{port}" in out


def test_client_side_attainment_uses_the_one_definition():
    from scripts.bench_serve import attainment

    result = {"ttfts": [0.5, 0.5, 3.0, 0.5, 0.1], "errors": ["", "", "", "", "boom"],
              "itls": [[0.1, 0.1], [0.1, 0.2], [0.1, 0.1], [0.1], []]}
    # met; a gap over 0.125 s; first token late; a token short; failed
    assert attainment(result, 3, ttft_slo=2.0, tbt_slo=0.125) == 1 / 5


@pytest.fixture(scope="module")
def small_kv(server):
    """The live server's model on a 384-token KV cache: clients contend for blocks
    (preemption), one at most 384 tokens long."""
    from dataclasses import replace

    from engine_adapter.executor_torch import TorchExecutor

    live = server.loop.engine
    config = replace(live.config, kv_cache_tokens=384, max_model_len=384)
    return config, TorchExecutor(live.executor.model, config.num_kv_blocks, config.block_size)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 200), st.integers(1, 40)),
    st.tuples(st.just("abort"), st.integers(0, 20)),
    st.tuples(st.just("pause"), st.integers(0, 30))), min_size=1, max_size=14))
@example(ops=[("submit", 180, 40), ("submit", 180, 40), ("submit", 150, 30),
              ("pause", 5), ("abort", 2), ("submit", 20, 5)])  # (preempts: 360 of 384 held)
def test_any_mix_of_clients_and_aborts_ends_every_stream_and_frees_every_block(server, small_kv,
                                                                              ops):
    """Requests arriving, leaving and contending for a small KV cache, in any order: every
    stream ends once; a finished one has exactly its tokens; what the streams got is what
    the engine emitted; no request stays and no KV block leaks."""
    config, executor = small_kv
    executor.reset()
    engine = Engine(config, executor=executor, model_config=server.loop.engine.model_config)
    metrics = ServingMetrics(2.0, 0.125)
    loop = ServingLoop(engine, server.loop.decide, metrics).start()
    streams = []
    try:
        for op in ops:
            if op[0] == "submit":
                streams.append((loop.submit(list(range(op[1])), op[2]), op[2]))
            elif op[0] == "abort" and streams:
                loop.abort(streams[op[1] % len(streams)][0].request_id)
            else:
                time.sleep(op[1] / 1000)
        received, ends = 0, {"length": 0, "abort": 0}
        for stream, max_tokens in streams:
            tokens, end = [], None
            while not isinstance(end, StreamEnd):
                end = stream.get(60)
                assert end is not None, "a stream never ended"
                if not isinstance(end, StreamEnd):
                    tokens.append(end)
            assert end.reason in ends
            ends[end.reason] += 1
            assert len(tokens) == max_tokens if end.reason == "length" else \
                len(tokens) < max_tokens
            assert stream.get(0.01) is None  # (nothing after the end)
            received += len(tokens)
        deadline = time.monotonic() + 10
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)  # (an abort of a request in a batch in flight ends with it)
    finally:
        loop.stop()
    assert not engine.has_unfinished() and not engine.scheduler.requests
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert metrics.outcomes["finished"] == ends["length"]
    assert metrics.outcomes["aborted"] == ends["abort"]
    assert metrics.generation_tokens == received


def test_a_request_the_loop_does_not_take_in_is_withdrawn(server):
    """A loop busy past ``submit``'s timeout: the request is withdrawn, never runs later."""
    live = server.loop.engine
    engine = Engine(live.config, executor=live.executor, model_config=live.model_config)
    loop = ServingLoop(engine, server.loop.decide, ServingMetrics(2.0, 0.125))  # not started
    with pytest.raises(RuntimeError, match="did not take the request"):
        loop.submit([1, 2, 3], 2, timeout=0.05)
    loop.start()
    stream = loop.submit([4, 5, 6], 2)
    while not isinstance(stream.get(30), StreamEnd):
        pass
    loop.stop()
    assert loop.metrics.outcomes == {"finished": 1}  # (the first never ran)
    assert not engine.scheduler.requests
