"""``bigrec serve``: a real uvicorn server on a free loopback port, spoken to with httpx."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from common import free_port

from bigrec.app.recommender import Recommender
from bigrec.app.service import create_app
from bigrec.stages.serve import Config
from run_fixture import TAUGHT, TITLES, tiny_run

CASINO, JUMANJI, HEAT, HEAT_TWIN = 6, 8, 5, 19
LIMITS = dict(max_history=12, max_k=15, max_title_length=60)


@contextlib.contextmanager
def serving(rec, **settings):
    """Run ``create_app(rec)`` under uvicorn in a thread, on a socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(rec, Config(run=str(rec.run_dir), port=port, **settings).limits())
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return Recommender.from_run(tiny_run(tmp_path_factory), device="cpu")


@pytest.fixture(scope="module")
def url(rec):
    with serving(rec, batch_window_ms=5, max_batch=16, **LIMITS) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def test_health_and_docs(client, rec):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["run"]["items"] == len(TITLES) and health["run"]["ci_available"] is True
    assert {"requests", "batches", "max_batch_size", "mean_batch_size"} <= set(health["stats"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = client.get("/openapi.json").json()
    assert {"/recommend", "/items", "/health"} <= set(schema["paths"])
    assert health["run"]["sasrec_available"] is True and health["run"]["popularity_available"] is True
    assert health["run"]["dataset"] == "ml-100k"


def test_page_is_served_and_calls_the_api_it_documents(client):
    """The page at / is one offline file (no external script, style or font) whose JavaScript calls
    /health, /items?q= and POST /recommend with baselines; the browser test drives it for real."""
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for element in ('id="search"', 'id="suggestions"', 'id="history"', 'id="go"', 'id="results"', 'id="error"',
                    'id="run-info"', 'id="ci"', 'id="k"'):
        assert element in html, element
    assert 'fetch(path' in html and '"/health"' in html and '"/items?"' in html and '"/recommend"' in html
    assert "baselines: true" in html and "http://" not in html and "https://" not in html  # nothing fetched from afar


def test_recommend_with_baselines_gives_sasrec_and_popularity_for_the_same_history(client, rec):
    history = [0, 5, 7]
    body = client.post("/recommend", json={"history": history, "k": 4, "baselines": True,
                                           "exclude_history": True}).json()
    sasrec, popularity = body["baselines"]["sasrec"], body["baselines"]["popularity"]
    assert len(sasrec) == len(popularity) == 4
    expected = rec.sasrec.score([history])[0].float()
    seen = {i for h in history for i in rec.catalog.ids_for(TITLES[h])}
    order = [i for i in torch.argsort(-expected, stable=True).tolist() if i not in seen][:4]
    assert [i["id"] for i in sasrec] == order and all(i["title"] == TITLES[i["id"]] for i in sasrec)
    counts = rec.popularity
    assert [i["score"] for i in popularity] == sorted((float(counts[i]) for i in range(len(TITLES)) if i not in seen),
                                                      reverse=True)[:4]
    assert client.post("/recommend", json={"history": history, "k": 4}).json()["baselines"] is None


def test_recommend_answers(client, rec):
    (history, answer), (history2, answer2) = TAUGHT
    response = client.post("/recommend", json={"history": history, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated"] == f'"{answer}"' and body["grounded"] == answer and len(body["beams"]) == 2
    assert [m["how"] for m in body["history"]] == ["title", "title"]
    assert [m["id"] for m in body["history"]] == [TITLES.index(t) for t in history]
    assert len(body["items"]) == 5 and body["items"][0]["id"] == CASINO and body["items"][0]["score"] < 1e-4
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores) and all(i["title"] == TITLES[i["id"]] for i in body["items"])
    # The same answer as the recommender gives directly (the server is idle between requests here).
    (direct,) = rec.recommend([history], k=5)
    assert [(i["id"], i["score"]) for i in body["items"]] == [(i.id, pytest.approx(i.score)) for i in direct.items]
    # Ids work as well as titles, and the other taught history gets its own answer.
    by_ids = client.post("/recommend", json={"history": [TITLES.index(t) for t in history2], "k": 3}).json()
    assert by_ids["generated"] == f'"{answer2}"' and by_ids["items"][0]["id"] == JUMANJI
    assert [m["how"] for m in by_ids["history"]] == ["id", "id"]


def test_recommend_options(client):
    body = client.post("/recommend", json={"history": ["heet (1995)", "Heat (1995)"], "k": 15,
                                           "use_ci": True, "exclude_history": True}).json()
    assert body["use_ci"] is True and len(body["items"]) == 15
    assert body["ranking"] == "BIGRec + CI (distances re-weighted by SASRec's scores), as asked"
    assert body["history"][0]["how"] == "nearest" and body["history"][0]["distance"] > 0
    excluded = {HEAT, HEAT_TWIN, body["history"][0]["id"]}
    assert not excluded & {i["id"] for i in body["items"]}


@pytest.mark.parametrize("payload, field", [
    ({"history": []}, "history"),
    ({"history": [0, 99]}, "history[1]"),
    ({"history": [-3]}, "history[0]"),
    ({"history": [True]}, "history[0]"),
    ({"history": [1.5]}, "history[0]"),
    ({"history": ["Heat (1995)", ""]}, "history[1]"),
    ({"history": ["x" * 61]}, "history[0]"),
    ({"history": list(range(13))}, "history"),
    ({"history": [0], "k": 0}, "k"),
    ({"history": [0], "k": 16}, "k"),
    ({"history": [0], "use_ci": "maybe"}, "use_ci"),
    ({"history": [0], "extra": 1}, "extra"),
    ({"k": 3}, "history"),
    ({"history": "Heat (1995)"}, "history"),
])
def test_bad_input_is_422_naming_the_field(client, payload, field):
    response = client.post("/recommend", json=payload)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["message"].startswith(f"{field}:"), body["message"]
    assert body["detail"] and all("loc" in d and "msg" in d for d in body["detail"])


def test_bad_body_is_422(client):
    response = client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert client.get("/recommend").status_code == 405


def test_use_ci_without_sasrec_is_422(rec):
    bare = Recommender(rec.run_dir, rec.manifest, rec.catalog, rec.items, rec.gen_model, rec.embed_model,
                       rec.tokenizer, sasrec=None, max_history=rec.max_history)
    with serving(bare) as base:
        response = httpx.post(f"{base}/recommend", json={"history": [0], "use_ci": True}, timeout=60)
        assert response.status_code == 422 and response.json()["message"].startswith("use_ci: this run has no SASRec")
        assert httpx.post(f"{base}/recommend", json={"history": [0]}, timeout=60).status_code == 200


def test_a_likelihood_run_is_served(rec):
    """A run that ranks by likelihood answers with the recommender's own ranking (its top titles as the
    beams, the first as the grounded text), and refuses use_ci by name."""
    import dataclasses

    manifest = dataclasses.replace(rec.manifest, decoding="likelihood")
    ranked = Recommender(rec.run_dir, manifest, rec.catalog, rec.items, rec.gen_model, rec.embed_model,
                         rec.tokenizer, sasrec=rec.sasrec, max_history=rec.max_history)
    (expected,) = ranked.recommend([[0, 5]], k=4)
    with serving(ranked) as base:
        body = httpx.post(f"{base}/recommend", json={"history": [0, 5], "k": 4}, timeout=60).json()
        assert body["decoding"] == "likelihood" and body["beams"] == expected.generated
        assert body["generated"] == expected.generated[0] and body["grounded"] == expected.grounded
        assert [i["id"] for i in body["items"]] == [i.id for i in expected.items]
        assert [i["distance"] for i in body["items"]] == pytest.approx([i.distance for i in expected.items])
        assert body["items"][0]["score"] == pytest.approx(expected.items[0].score)
        response = httpx.post(f"{base}/recommend", json={"history": [0], "use_ci": True}, timeout=60)
        assert response.status_code == 422 and "ranks by likelihood" in response.json()["message"]
        assert httpx.get(f"{base}/health", timeout=60).json()["run"]["decoding"] == "likelihood"


def test_items_search(client):
    assert client.get("/items", params={"q": "heat"}).json() == {
        "query": "heat", "items": [{"id": HEAT, "title": "Heat (1995)"}, {"id": HEAT_TWIN, "title": "Heat (1995)"}]}
    assert [i["id"] for i in client.get("/items", params={"q": "B", "limit": 2}).json()["items"]] == [7, 12]
    assert client.get("/items", params={"q": "nothing like it"}).json()["items"] == []
    for params, field in [({}, "q"), ({"q": ""}, "q"), ({"q": "x" * 61}, "q"), ({"q": "a", "limit": 0}, "limit")]:
        response = client.get("/items", params=params)
        assert response.status_code == 422 and response.json()["message"].startswith(f"{field}:")


def test_concurrent_clients_are_batched(url, client):
    before = client.get("/health").json()["stats"]
    clients, per_client = 8, 50
    cases = [(history, TITLES.index(answer)) for history, answer in TAUGHT]

    def one_client(n: int) -> list[str]:
        problems = []
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(per_client):
                history, expected = cases[(n + i) % len(cases)]
                r = c.post("/recommend", json={"history": history, "k": 3})
                if r.status_code != 200:
                    problems.append(f"client {n} request {i}: {r.status_code} {r.text[:200]}")
                elif r.json()["items"][0]["id"] != expected:
                    problems.append(f"client {n} request {i}: top item {r.json()['items'][0]} for {history}")
        return problems

    with ThreadPoolExecutor(clients) as pool:
        problems = [p for found in pool.map(one_client, range(clients)) for p in found]
    assert problems == []
    after = client.get("/health").json()["stats"]
    assert after["requests"] - before["requests"] == clients * per_client
    assert after["failed_batches"] == before["failed_batches"]
    assert after["max_batch_size"] > 1  # concurrent requests shared generation calls
    assert after["batches"] - before["batches"] < clients * per_client


def test_cli_serve_subprocess(tmp_path_factory):
    """``bigrec serve`` as a user starts it: loopback by default, answers, stops on SIGTERM."""
    run_dir = tiny_run(tmp_path_factory)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "bigrec", "serve", "--run", str(run_dir), "--port", str(port),
                             "--log_level", "warning", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "bigrec serve did not come up"
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"history": TAUGHT[0][0], "k": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["items"][0]["id"] == CASINO
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    # uvicorn shuts down cleanly, then re-raises the signal it caught: exit status -SIGTERM.
    assert proc.returncode in (0, -15), out
    assert "Traceback" not in out and "ERROR" not in out, out


def test_a_bad_request_fails_alone(url, rec):
    """A title with a lone surrogate sent among eight valid concurrent requests: it gets a 422
    naming the item, every valid request its answer (before, the whole batch got 500)."""
    bad = b'{"history": ["\\ud800 Toy"], "k": 3}'
    history, answer = TAUGHT[0]

    def good(_):
        return httpx.post(f"{url}/recommend", json={"history": history, "k": 3}, timeout=120)

    def post_bad(_):
        return httpx.post(f"{url}/recommend", content=bad, headers={"content-type": "application/json"}, timeout=120)

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(post_bad if i == 4 else good, i) for i in range(9)]
        responses = [f.result() for f in futures]
    assert responses[4].status_code == 422 and responses[4].json()["message"].startswith("history[0]: title is not")
    assert [r.status_code for i, r in enumerate(responses) if i != 4] == [200] * 8
    assert all(r.json()["items"][0]["id"] == TITLES.index(answer) for i, r in enumerate(responses) if i != 4)


def test_a_batch_that_fails_answers_its_requests_one_by_one():
    import asyncio

    from bigrec.app.batching import Batcher

    def work(queries):
        if "bad" in queries:
            raise ValueError("bad query")
        return [q.upper() for q in queries]

    async def main():
        batcher = Batcher(work, max_batch=8, window_s=0.05, max_queue=16)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(q) for q in ["a", "bad", "c"]), return_exceptions=True)
        finally:
            await batcher.stop()

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError)


def test_request_body_over_the_cap_is_413_before_it_is_read(rec):
    with serving(rec, max_body_bytes=2048, **LIMITS) as base:
        big = httpx.post(f"{base}/recommend", content=b'{"history": ["' + b"x" * 5000 + b'"]}',
                         headers={"content-type": "application/json"}, timeout=30)
        assert big.status_code == 413 and "larger than 2048 bytes" in big.json()["message"]
        # a declared 50 MB body is refused at once, though only 1 KB of it is ever sent
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50000000\r\n\r\n" + b"x" * 1024)
            assert sock.recv(4096).startswith(b"HTTP/1.1 413")

        def chunks():
            yield b'{"history": ["'
            for _ in range(10):
                yield b"y" * 500
            yield b'"]}'

        chunked = httpx.post(f"{base}/recommend", content=chunks(), headers={"content-type": "application/json"},
                             timeout=30)  # no declared length: counted as it arrives
        assert chunked.status_code == 413
        small = httpx.post(f"{base}/recommend", json={"history": [0], "k": 2}, timeout=60)
        assert small.status_code == 200


def test_a_body_that_is_not_json_is_422_naming_the_body(client):
    """Found by schemathesis: the framework answered an unparseable body with an undocumented 400."""
    r = client.post("/recommend", content=b"\xffehn", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["message"].startswith("request: not a JSON object")
    documented = client.get("/openapi.json").json()["paths"]["/recommend"]["post"]["responses"]
    assert {"200", "413", "422", "503"} <= set(documented)
