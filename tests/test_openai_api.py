"""The OpenAI-compatible API over real HTTP on loopback, on a real 2-stage pipeline of a tiny GPT-2.

Streams and bodies have OpenAI's shapes; a greedy completion equals what ``python -m
smolcluster.infer`` prints; bad requests get a 4xx naming the field and the server
keeps serving; a client that hangs up frees the pipeline; a lost stage is a 503, not a
hang, and the server rebuilds the pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from smolcluster.bench.common import write_tiny_run
from smolcluster.data.text import TextTokenizer
from smolcluster.inference import InferencePipeline
from smolcluster.pipeline.quantize import StageFormat, kernels
from smolcluster.serving.app import WebServer, build_app
from smolcluster.serving.fair_queue import FairQueue
from smolcluster.serving.prompting import render
from smolcluster.serving.sessions import Sessions, Settings
from tests.conftest import run_cli, wait_until

MODEL = "tiny"
CONTEXT = 256
SLOW_CONTEXT = 1024  # the model for the cancel tests: a long answer takes seconds, so a cancel lands mid-answer


class Served:
    """Started sessions + web server; ``url`` is the API's base."""

    def __init__(self, run_dir: Path, *, liveness_s: float = 5.0, max_active: int = 4, **app_kw):
        self.run_dir = run_dir
        self.sessions = Sessions(lambda: InferencePipeline.start_local(run_dir, stages=2, n_head=4, heartbeat_s=0.2,
                                                                   liveness_s=liveness_s),
                             max_active=max_active).start()
        try:
            self.server = WebServer(build_app(self.sessions, MODEL, **{"ui": False, **app_kw})).start()
        except BaseException:
            self.sessions.close()
            raise
        self.url = self.server.url
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.sessions.close()

    def stage_requests(self) -> list:
        return [s["requests"] for s in self.sessions.health()["stages"]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("tiny-run"), CONTEXT)


def serving(run_dir: Path):
    s = Served(run_dir)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def served(run_dir):
    yield from serving(run_dir)


@pytest.fixture(scope="module")
def slow_run_dir(tmp_path_factory) -> Path:
    """Big enough that a full-context answer takes seconds: the 2x64 model writes its whole answer in
    a fraction of a second, so on a loaded machine it could finish before a cancel reached it."""
    return write_tiny_run(tmp_path_factory.mktemp("slow-run"), SLOW_CONTEXT, n_layer=8, n_embd=256)


@pytest.fixture(scope="module")
def slow_served(slow_run_dir):
    yield from serving(slow_run_dir)


def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent-event stream: dicts, and the final "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream(served: Served, path: str, body: dict) -> list:
    with served.http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def completion(**kw) -> dict:
    return {"model": MODEL, "temperature": 0, **kw}


# -- shapes and equality ------------------------------------------------------------------------------------
def test_models_lists_the_served_model(served):
    r = served.http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model" and body["data"][0]["context_length"] == CONTEXT
    assert body["data"][0]["kernels"] == [kernels(StageFormat())] * 2  # each stage's matmul path, said by the stage
    assert served.http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    r = served.http.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_greedy_completion_streams_in_steps_and_equals_the_whole_body_and_the_pipeline(served):
    tok = served.sessions.tokenizer
    prompt = "The meaning of life is"
    body = completion(prompt=prompt, max_tokens=24)
    whole = served.http.post("/v1/completions", json=body)
    assert whole.status_code == 200
    w = whole.json()
    assert w["object"] == "text_completion" and w["model"] == MODEL and w["id"].startswith("cmpl-")
    assert isinstance(w["created"], int) and len(w["choices"]) == 1
    choice = w["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    n_prompt = len(tok.encode(prompt))
    assert w["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 24, "total_tokens": n_prompt + 24}
    direct = served.sessions.pipeline().submit(prompt, max_new_tokens=24)
    assert choice["text"] == direct.text() != ""

    events = sse_events_of(served, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" and c["model"] == MODEL
               for c in chunks)
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert sum(1 for p in pieces if p) >= 2  # streamed in steps, not one piece at the end
    assert "".join(pieces) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def sse_events_of(served: Served, body: dict) -> list:
    return stream(served, "/v1/completions", body)


def test_stop_sequences_cut_the_text_and_echo_returns_the_prompt(served):
    prompt = "def main():"
    full = served.http.post("/v1/completions", json=completion(prompt=prompt, max_tokens=30)).json()
    text = full["choices"][0]["text"]
    stop = text[7:10]
    assert len(stop) == 3 and stop.strip()
    cut = served.http.post("/v1/completions", json=completion(prompt=prompt, max_tokens=30, stop=[stop])).json()
    assert cut["choices"][0]["text"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["text"] for c in sse_events_of(
        served, completion(prompt=prompt, max_tokens=30, stop=stop))[:-1])
    assert streamed == text[:text.find(stop)]
    echo = served.http.post("/v1/completions", json=completion(prompt=prompt, max_tokens=30, echo=True)).json()
    assert echo["choices"][0]["text"] == prompt + text
    ids = served.sessions.tokenizer.encode(prompt)  # a prompt of token ids gives the same answer
    by_ids = served.http.post("/v1/completions", json=completion(prompt=ids, max_tokens=30)).json()
    assert by_ids["choices"][0]["text"] == text


def test_chat_completions_stream_and_body_agree_and_follow_the_transcript(served):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Say hello"}]}]
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 40}
    r = served.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    w = r.json()
    assert w["object"] == "chat.completion" and w["id"].startswith("chatcmpl-") and w["model"] == MODEL
    msg = w["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert w["choices"][0]["finish_reason"] in ("stop", "length")
    transcript = render([("system", "You are terse."), ("user", "Say hello")])
    assert w["usage"]["prompt_tokens"] == len(served.sessions.tokenizer.encode(transcript))
    # the same transcript through /v1/completions, cut at the next turn, is the same answer
    raw = served.http.post("/v1/completions", json=completion(
        prompt=transcript, max_tokens=40, stop=["\nUser:", "\nSystem:", "\nAssistant:"])).json()
    assert msg["content"] == raw["choices"][0]["text"].lstrip()

    events = stream(served, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == w["usage"]
    final = chunks[-2]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] == w["choices"][0]["finish_reason"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == msg["content"]


def test_the_api_streams_what_infer_prints_for_the_same_checkpoint_and_prompt(served, run_dir):
    prompt = "class Foo:"
    p = run_cli("smolcluster.infer", f"checkpoint={run_dir}", f"prompt={prompt}", "max_new_tokens=30",
                "cluster.heartbeat_s=0.2", timeout=180)
    events = sse_events_of(served, completion(prompt=prompt, max_tokens=30))
    text = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert len(text) > 10
    assert p.stdout == prompt + text + "\n"


# -- bad requests ----------------------------------------------------------------------------------------
LONG = "word " * 600  # ~600+ tokens, more than the 256 of the context
BAD_COMPLETIONS = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": LONG}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),  # past the context: refused, not cut
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi", "stop": 5}, 400, "stop"),
    ({"prompt": "hi", "seed": -1}, 400, "seed"),
    ({"prompt": "hi", "logprobs": 5}, 400, "logprobs"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": 123}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "model": None}, 400, "model"),
    ({"prompt": "hi", "model": 7}, 400, "model"),
]
BAD_CHATS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user"}]}, 400, "messages[1].content"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 256}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
]


@pytest.mark.parametrize("path, body, status, param",
                         [("/v1/completions", *case) for case in BAD_COMPLETIONS]
                         + [("/v1/chat/completions", *case) for case in BAD_CHATS],
                         ids=[f"completions-{c[2]}-{i}" for i, c in enumerate(BAD_COMPLETIONS)]
                         + [f"chat-{c[2]}-{i}" for i, c in enumerate(BAD_CHATS)])
def test_a_bad_request_gets_a_4xx_naming_the_field(served, path, body, status, param):
    full = {"model": MODEL, **body}
    if "model" in body and body["model"] is None:
        del full["model"]
    for stream_flag in (False, True):
        r = served.http.post(path, json={**full, "stream": stream_flag} if "stream" not in body else full)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param and param.split("[")[0] in err["message"]
        assert err["type"] == "invalid_request_error" and err["message"]
    assert served.sessions.health()["queue"]["active"] == 0  # nothing reached the pipeline


def test_malformed_bodies_wrong_methods_and_unknown_paths_get_json_errors_and_the_server_keeps_serving(served):
    r = served.http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = served.http.post("/v1/completions", json=["a", "list"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = served.http.get("/v1/completions")
    assert r.status_code == 405 and "use POST" in r.json()["error"]["message"]
    r = served.http.post("/v1/embeddings", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = served.http.post("/v1/completions", json=completion(prompt="still here", max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# -- concurrency and cancellation ---------------------------------------------------------------------------
def test_two_concurrent_streams_each_get_their_own_answer(served):
    bodies = [completion(prompt="import os", max_tokens=60, temperature=0.9, seed=11),
              completion(prompt="Once upon a time", max_tokens=60, temperature=0.9, seed=22)]
    solo = [served.http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    both_open = threading.Barrier(2, timeout=60)
    results: list = [None, None]
    errors: list = []

    def run(i: int) -> None:
        try:
            texts = []
            with httpx.Client(base_url=served.url, timeout=60) as c, \
                    c.stream("POST", "/v1/completions", json={**bodies[i], "stream": True}) as r:
                lines = r.iter_lines()
                for line in lines:  # up to this stream's first piece of text
                    if line.startswith("data: {"):
                        texts.append(json.loads(line[6:])["choices"][0]["text"])
                        if texts[-1]:
                            break
                both_open.wait()  # both streams are open and answering at once
                events = sse_events_from(lines)
            results[i] = "".join(texts) + "".join(e["choices"][0]["text"] for e in events[:-1])
            assert events[-1] == "[DONE]"
        except Exception as e:  # surfaced below, with the other thread's
            errors.append(e)
            both_open.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == solo and solo[0] != solo[1]


def sse_events_from(lines) -> list:
    out = []
    for line in lines:
        if line:
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_client_that_hangs_up_mid_stream_cancels_its_request_in_the_pipeline(slow_served):
    served = slow_served
    max_tokens = SLOW_CONTEXT - 8
    with served.http.stream("POST", "/v1/completions",
                            json=completion(prompt="Hi", max_tokens=max_tokens, stream=True)) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"])
        live = served.sessions.live()
        assert len(live) == 1
        gen = live[0]
    # leaving the block closed the connection
    assert gen.wait(30)
    assert gen.finish_reason == "cancelled" and gen.completion_tokens < max_tokens
    assert wait_until(lambda: served.stage_requests() == [0, 0] and served.sessions.health()["in_flight"] == 0)


def test_a_full_queue_is_refused_with_429_and_requests_are_served_fairly(slow_served):
    served = slow_served
    sessions, shared_queue = served.sessions, served.sessions.queue
    sessions.queue = FairQueue(slots=1, max_waiting=1)  # one answer at a time, one more may wait
    gens = []
    try:
        ids = sessions.tokenizer.encode("Hi")
        hog = sessions.submit(ids, user="hog", settings=Settings(max_new_tokens=SLOW_CONTEXT - 4, stop_at_eos=False))
        waiting = sessions.submit(ids, user="hog", settings=Settings(max_new_tokens=5))
        gens += [hog, waiting]
        r = served.http.post("/v1/completions", json=completion(prompt="x", max_tokens=2))
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        waiting.cancel()  # leaves the queue without ever reaching the pipeline
        assert waiting.wait(10) and waiting.finish_reason == "cancelled" and waiting.started_at is None
        # hog's next request waits behind alice's, which came later: turns go round-robin over users
        sessions.queue.max_waiting = 8
        hog2 = sessions.submit(ids, user="hog", settings=Settings(max_new_tokens=3))
        alice = sessions.submit(ids, user="alice", settings=Settings(max_new_tokens=3))
        gens += [hog2, alice]
        assert hog.state == "running" and alice.position() == 0 and hog2.position() == 1
        hog.cancel()
        assert alice.wait(30) and hog2.wait(30)
        assert alice.started_at < hog2.started_at and alice.finish_reason == hog2.finish_reason == "length"
        assert hog.finish_reason == "cancelled"
    finally:
        for g in gens:
            g.cancel()
            g.wait(30)
        sessions.queue = shared_queue


# -- a pipeline that goes down -------------------------------------------------------------------------------
def test_a_lost_stage_gives_503_at_once_then_the_server_rebuilds_the_pipeline(slow_run_dir):
    s = Served(slow_run_dir, liveness_s=3.0)
    s.sessions.reconnect = False  # first see it down; reconnecting is switched on below
    try:
        procs = list(s.sessions.pipeline()._children.procs.values())
        with s.http.stream("POST", "/v1/completions",
                           json=completion(prompt="Hi", max_tokens=SLOW_CONTEXT - 8, stream=True)) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            os.kill(procs[1].pid, signal.SIGKILL)
            events = sse_events_from(lines)  # the stream ends (within liveness_s), it does not hang
        assert events[-1] == "[DONE]"
        err = events[-2]["error"]
        assert err["code"] == "pipeline_unavailable" and "stage" in err["message"]

        assert wait_until(lambda: s.http.get("/health").status_code == 503)
        assert s.http.get("/health").json()["status"] == "down"
        for path, body in (("/v1/completions", completion(prompt="Hi")),
                           ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})):
            for stream_flag in (False, True):
                r = s.http.post(path, json={**body, "stream": stream_flag})
                assert r.status_code == 503, r.text
                e = r.json()["error"]
                assert e["code"] == "pipeline_unavailable" and e["type"] == "service_unavailable"
                assert "pipeline is down" in e["message"] and "stage" in e["message"]

        s.sessions.reconnect = True
        assert wait_until(lambda: s.http.get("/health").status_code == 200, timeout_s=90, every_s=0.2)
        assert s.sessions.reconnects == 1 and all(p.poll() is not None for p in procs)
        r = s.http.post("/v1/completions", json=completion(prompt="Hi", max_tokens=5))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        s.close()


def test_the_tokenizer_of_the_run_is_what_the_server_uses(served, run_dir):
    tok = TextTokenizer.load(run_dir / "tokenizer.json")
    assert served.sessions.tokenizer.encode("hello world") == tok.encode("hello world")


# -- the OpenAPI document: what it says is what the server does ----------------------------------------------
def documented(served: Served) -> dict:
    r = served.http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


_validators: dict = {}


def schema_of(doc: dict, name: str):
    """A JSON Schema validator for one of the document's component schemas."""
    import jsonschema

    key = (json.dumps(doc["components"], sort_keys=True), name)
    if key not in _validators:
        _validators[key] = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                                            "components": doc["components"]})
    return _validators[key]


def test_the_openapi_document_lists_typed_request_and_response_bodies(served):
    import jsonschema

    doc = documented(served)
    schemas = doc["components"]["schemas"]
    for s in schemas.values():
        jsonschema.Draft202012Validator.check_schema(s)
    comp, chat = schemas["CompletionRequest"], schemas["ChatCompletionRequest"]
    assert sorted(comp["required"]) == ["model", "prompt"] and sorted(chat["required"]) == ["messages", "model"]
    assert comp["additionalProperties"] is False and chat["additionalProperties"] is False  # unknown fields: 400
    props = comp["properties"]
    assert {"type": "integer", "minimum": 1} in [{k: v for k, v in a.items() if k != "description"}
                                                 for a in props["max_tokens"]["anyOf"]]
    assert any(a.get("type") == "number" and a["minimum"] == 0 and a["maximum"] == 2
               for a in props["temperature"]["anyOf"])
    assert props["logprobs"]["enum"] == [None, False, 0]  # not supported: only "off" is accepted
    assert chat["properties"]["messages"]["minItems"] == 1
    message = schemas["Message"]
    assert sorted(message["required"]) == ["content", "role"]
    assert message["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    assert sorted(schemas["ModelCard"]["required"]) == ["architecture", "context_length", "created", "id",
                                                        "owned_by", "vocab_size"]
    for path, request, answer, chunk in (("/v1/completions", "CompletionRequest", "Completion", "Completion"),
                                         ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion",
                                          "ChatCompletionChunk")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{request}"}
        ok = op["responses"]["200"]["content"]
        assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
        assert ok["text/event-stream"]["itemSchema"]["properties"]["data"]["contentSchema"] == {
            "$ref": f"#/components/schemas/{chunk}"}
        for status in ("400", "401", "404", "429", "503"):
            assert op["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}
        assert "422" not in op["responses"]  # FastAPI's default: this server answers 400 instead
    assert doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelList"}


def check_answer(doc: dict, r: httpx.Response, stream: bool, chunk: str, body: str) -> None:
    """A response is what the document says: an error body, a JSON body, or a stream of chunks."""
    if r.status_code != 200:
        schema_of(doc, "ErrorResponse").validate(r.json())
    elif stream:
        events = sse_events_from(r.iter_lines())
        assert events[-1] == "[DONE]" and len(events) >= 2
        for e in events[:-1]:
            schema_of(doc, chunk).validate(e)
    else:
        schema_of(doc, body).validate(r.json())


def test_real_answers_are_what_the_document_says(served):
    doc = documented(served)
    schema_of(doc, "ModelList").validate(served.http.get("/v1/models").json())
    schema_of(doc, "ModelCard").validate(served.http.get(f"/v1/models/{MODEL}").json())
    for path, chunk, body, request in (
            ("/v1/completions", "Completion", "Completion", completion(prompt="Hi", max_tokens=5, echo=True)),
            ("/v1/chat/completions", "ChatCompletionChunk", "ChatCompletion",
             {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})):
        for stream_flag, opts in ((False, {}), (True, {}), (True, {"stream_options": {"include_usage": True}})):
            r = served.http.post(path, json={**request, "stream": stream_flag, **opts})
            assert r.status_code == 200
            check_answer(doc, r, stream_flag, chunk, body)
        for bad_body in ({**request, "model": "gpt-4"}, {**request, "max_tokens": "x"}, {"model": MODEL}):
            r = served.http.post(path, json=bad_body)
            assert r.status_code in (400, 404)
            check_answer(doc, r, False, chunk, body)


CANDIDATES = ["x", "", 0, 1, 2.0, -1, 1.5, True, False, None, [], ["a"], [1], {}, {"a": 1}]


@pytest.mark.parametrize("path, request_schema, chunk, body, base", [
    ("/v1/completions", "CompletionRequest", "Completion", "Completion",
     {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}),
    ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionChunk", "ChatCompletion",
     {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}),
], ids=["completions", "chat"])
def test_every_documented_field_is_enforced_as_documented(served, path, request_schema, chunk, body, base):
    """Schema-driven: every field of the documented request body, set to values of every JSON type. A value
    the document refuses gets a 400 naming that field; one it accepts is served (404 only for a model name
    that is not this one). Every answer matches its documented schema."""
    doc = documented(served)
    validator = schema_of(doc, request_schema)
    fields = [*doc["components"]["schemas"][request_schema]["properties"], "frobnicate"]
    seen = {"refused": 0, "served": 0}
    for field in fields:
        for value in CANDIDATES:
            req = {**base, field: value}
            r = served.http.post(path, json=req)
            what = f"{field}={value!r}: {r.status_code} {r.text[:300]}"
            if validator.is_valid(req):
                assert r.status_code == 200 or (field == "model" and r.status_code == 404), what
                seen["served"] += 1
            else:
                assert r.status_code == 400, what
                param = r.json()["error"]["param"]
                assert param.split("[")[0].split(".")[0] == field, what
                seen["refused"] += 1
            check_answer(doc, r, r.headers["content-type"].startswith("text/event-stream"), chunk, body)
    assert seen["refused"] > 100 and seen["served"] > 50, seen
    assert served.sessions.health()["queue"]["active"] == 0


def test_answers_are_not_held_back_by_nagles_algorithm():
    """uvicorn writes a response's head and body apart; without TCP_NODELAY on the server's connections the
    body waits for the client's delayed ACK, 40 ms on Linux, on every request and every streamed chunk.
    (A behaviour, not a timing: the connections the web server accepts have Nagle off.)"""
    import socket

    from smolcluster.serving.app import bind

    listener = bind("127.0.0.1", 0)
    try:
        with socket.create_connection(listener.getsockname()[:2], timeout=10):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()
