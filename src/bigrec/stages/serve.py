"""``bigrec serve``: an HTTP recommendation service for a finished run folder (FastAPI + uvicorn).

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /recommend`` ``{"history": [titles or ids], "k": 10, "use_ci": null, "exclude_history": false}``
  (``use_ci`` null or absent: the ranking the run chose on validation; the answer's ``ranking`` says which)
  -> the generated text, the history matches and the top-k items (id, title, score, distance);
- ``GET /items?q=...&limit=20``: catalogue titles containing ``q`` (ignoring case);
- ``GET /health``: the run's description and batching statistics.

The run folder is loaded once (:class:`bigrec.app.recommender.Recommender`). Requests wait in an
asyncio queue; one collector takes the first waiting request, waits ``batch_window_ms`` for
company, and hands up to ``max_batch`` requests to a single worker thread as one generation
call. While the worker is busy, new requests queue up and form the next batch, so under load
batches grow by themselves and the event loop never blocks on the model.

Bad input is answered with 422 and a ``message`` naming the field (``history[2]: item id 99999
is not in the catalogue (ids 0..1681)``), besides FastAPI's usual ``detail`` list. A full
queue is answered with 503. The service binds loopback unless ``--host`` says otherwise; it
has no authentication.
"""

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

from starlette.exceptions import HTTPException

from bigrec.config import option

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass
class Config:
    run: str = option(help="finished run folder (holds run.yaml; written by bigrec demo)")
    host: str = option("127.0.0.1", "address to bind; loopback by default (the service has no authentication)")
    port: int = option(8000, "TCP port", minimum=0)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda if available)")
    max_batch: int = option(16, "most requests in one generation call", minimum=1)
    batch_window_ms: float = option(5.0, "how long the first waiting request waits for others to join its batch", minimum=0)
    max_queue: int = option(1024, "requests waiting beyond this are refused with 503", minimum=1)
    max_history: int = option(50, "most items in a request's history (the prompt uses the latest of them)", minimum=1)
    max_k: int = option(100, "largest k a request may ask for", minimum=1)
    max_title_length: int = option(300, "longest title (characters) in a history or a search", minimum=1)
    max_body_bytes: int = option(65536, "largest request body; a larger one is refused with 413 before it is "
                                        "read (the longest valid history is far smaller)", minimum=1)
    threads: int = option(0, "torch CPU threads; 0 = torch's default")
    log_level: str = option("info", "uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])


# --- batching -------------------------------------------------------------------------------

class TooLarge(HTTPException):
    """A request body past the size cap, raised while it is being received (an HTTPException, so
    that the framework's body parsing passes it on instead of answering 400)."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class BodyLimit:
    """ASGI wrapper: a body declared larger than ``max_bytes`` is answered 413 before any of it
    is read; a body without a declared length is counted as it arrives and refused at the cap."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.reject(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge
            return message

        await self.app(scope, counted, send)

    async def reject(self, send) -> None:
        body = json.dumps({"message": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class Busy(RuntimeError):
    """The request queue is full."""


class BatchStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.batches = 0
        self.max_batch = 0
        self.failed_batches = 0
        self.busy_s = 0.0
        self.sizes: dict[int, int] = {}

    def add(self, size: int, seconds: float, ok: bool) -> None:
        self.batches += 1
        self.requests += size
        self.max_batch = max(self.max_batch, size)
        self.busy_s += seconds
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.failed_batches += not ok

    def to_dict(self, queued: int) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "max_batch_size": self.max_batch,
                "mean_batch_size": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "failed_batches": self.failed_batches, "model_busy_s": round(self.busy_s, 3),
                "queued": queued, "uptime_s": round(time.time() - self.started, 1)}


class Batcher:
    """Collects concurrent requests into batches for one worker thread running ``work``."""

    def __init__(self, work, max_batch: int, window_s: float, max_queue: int):
        self.work = work  # list[query] -> list[result], run on the worker thread
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigrec-model")

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._collect(), name="bigrec-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.queue is not None and not self.queue.empty():
            _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(Busy("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, query):
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((query, future))
        except asyncio.QueueFull:
            raise Busy(f"{self.max_queue} requests are already waiting; try again shortly") from None
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            if self.window_s > 0 and self.queue.qsize() < self.max_batch - 1:
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [(q, f) for q, f in batch if not f.done()]  # drop requests whose client went away
            if not batch:
                continue
            await self._run(loop, batch)

    async def _run(self, loop, batch: list) -> None:
        """One call for the batch; if it fails, each request again on its own, so that a request
        the checks before batching let through fails alone, never its neighbours."""
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.work, [q for q, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request(s)
            self.stats.add(len(batch), time.perf_counter() - start, ok=False)
            if len(batch) > 1:
                log.warning("batch of %d failed (%s); answering its requests one by one", len(batch), exc)
                for one in batch:
                    await self._run(loop, [one])
                return
            log.exception("request failed")
            if not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        self.stats.add(len(batch), time.perf_counter() - start, ok=True)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


# --- the application ------------------------------------------------------------------------

def _field(loc: tuple | list) -> str:
    """``("body", "history", 2)`` -> ``history[2]``."""
    out = ""
    for part in loc:
        if part in ("body", "query") and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request"


def _message(errors: list[dict]) -> str:
    return "; ".join(f"{_field(e.get('loc', ()))}: {str(e.get('msg', '')).removeprefix('Value error, ')}"
                     for e in errors)


def create_app(rec, config: Config | None = None):
    """The FastAPI application serving ``rec`` (a :class:`bigrec.app.recommender.Recommender`)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

    from bigrec.app.recommender import HistoryError
    from bigrec.app.recommender import Query as RecQuery

    config = config or Config(run=str(rec.run_dir))
    max_title = config.max_title_length

    def history_item(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected a catalogue id (integer) or a title (string), got {value!r}")
        if isinstance(value, str) and len(value) > max_title:
            raise ValueError(f"title of {len(value)} characters; at most {max_title} are allowed")
        return value

    HistoryItem = Annotated[StrictInt | StrictStr, BeforeValidator(history_item)]  # noqa: N806

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"history": ["Toy Story (1995)", "Heat (1995)"], "k": 10, "use_ci": False}]})
        history: list[HistoryItem] = Field(
            min_length=1, max_length=config.max_history,
            description=f"oldest first: catalogue ids or titles (at most {config.max_history}; the prompt uses "
                        f"the latest {rec.max_history}). A title not in the catalogue is matched to the nearest.")
        k: int = Field(10, ge=1, le=config.max_k, description="how many items to return")
        use_ci: bool | None = Field(None, description="re-weight distances by the run's SASRec scores; null: the "
                                                      "ranking the run chose on validation")
        exclude_history: bool = Field(False, description="leave the history's items out")
        baselines: bool = Field(False, description="also SASRec's and popularity's top k for the same history")

    class MatchOut(BaseModel):
        given: int | str
        id: int
        title: str
        how: str = Field(description="id, title, case (ignoring case) or nearest (embedding distance)")
        distance: float | None = None

    class ItemOut(BaseModel):
        id: int
        title: str
        score: float = Field(description="ranking score, lower is better (distance, or re-weighted with use_ci)")
        distance: float = Field(description="L2 distance to the generated text's embedding")

    class ScoredOut(BaseModel):
        id: int
        title: str
        score: float = Field(description="the model's score, higher is better")

    class RecommendResponse(BaseModel):
        generated: str = Field(description="the top beam, cut at the end of its title")
        beams: list[str]
        grounded: str = Field(description="the text whose embedding ranked the items")
        history: list[MatchOut]
        items: list[ItemOut]
        use_ci: bool
        ranking: str = Field(description="which ranking this is and why")
        baselines: dict[str, list[ScoredOut]] | None = Field(None, description="with baselines: sasrec and "
                                                                               "popularity top k, where the run has them")
        batch_size: int = Field(description="requests that shared this generation call")

    class CatalogItem(BaseModel):
        id: int
        title: str

    class ItemsResponse(BaseModel):
        query: str
        items: list[CatalogItem]

    batcher = Batcher(rec.recommend_queries, config.max_batch, config.batch_window_ms / 1000, config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="bigrec", lifespan=lifespan,
                  description="BIGRec recommendations (bi-step grounding) for the run folder "
                              f"{rec.run_dir.name}: {len(rec.catalog)} items.")
    app.state.batcher = batcher
    app.state.recommender = rec
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    def unprocessable(errors: list[dict]) -> JSONResponse:
        return JSONResponse(status_code=422, content={"message": _message(errors), "detail": errors})

    @app.exception_handler(TooLarge)
    async def on_too_large(request: Request, exc: TooLarge) -> JSONResponse:
        return JSONResponse(status_code=413, content={"message": f"request body larger than {config.max_body_bytes} "
                                                                 "bytes"}, headers={"connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
                  for e in exc.errors()]
        return unprocessable(errors)

    page = (resources.files("bigrec.app") / "web" / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def root() -> HTMLResponse:
        """The page: search the catalogue, build a history, see BIGRec beside SASRec and popularity."""
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the run's description and the batching statistics."""
        return {"status": "ok", "run": rec.describe(), "stats": batcher.stats.to_dict(batcher.queue.qsize())}

    @app.get("/items", response_model=ItemsResponse)
    async def items(q: Annotated[str, Query(min_length=1, max_length=max_title, description="text to find")],
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
        """Catalogue items whose title contains ``q`` (ignoring case), titles starting with it first."""
        return {"query": q, "items": [{"id": i, "title": t} for i, t in rec.search(q, limit)]}

    @app.post("/recommend", response_model=RecommendResponse,
              responses={422: {"description": "bad input; `message` names the field"},
                         503: {"description": "too many requests waiting"}})
    async def recommend(body: RecommendRequest) -> Any:
        """Generate with beam search, ground the top generation to catalogue items, return the top k."""
        try:
            rec.check_history(body.history)
        except HistoryError as exc:
            loc = ["body", "history"] + ([exc.index] if exc.index is not None else [])
            return unprocessable([{"loc": loc, "msg": exc.reason, "type": "value_error"}])
        if body.use_ci and not rec.has_ci:
            return unprocessable([{"loc": ["body", "use_ci"], "type": "value_error",
                                   "msg": "this run has no SASRec model (or no ci_gamma) to re-weight with"}])
        try:
            result = await batcher.submit(RecQuery(list(body.history), body.k, body.use_ci, body.exclude_history,
                                                   body.baselines))
        except Busy as exc:
            return JSONResponse(status_code=503, content={"message": str(exc)})
        out = result.to_dict()
        return {"generated": result.generated[0] if result.generated else "", "beams": result.generated,
                "grounded": result.grounded, "history": out["history"], "items": out["items"],
                "use_ci": result.use_ci, "ranking": result.ranking, "baselines": out["baselines"],
                "batch_size": int(result.timing.get("batch", 1))}

    return app


def run(config: Config) -> int:
    import torch
    import uvicorn

    from bigrec.app.recommender import Recommender

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if config.host not in LOOPBACK:
        log.warning("binding %s: the service is reachable from other machines and has no authentication",
                    config.host)
    rec = Recommender.from_run(config.run, device=config.device)
    app = create_app(rec, config)
    log.info("serving %s on http://%s:%d (docs at /docs)", rec.run_dir, config.host, config.port)
    uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level)).run()
    return 0
