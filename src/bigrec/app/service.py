"""The HTTP service of a finished run (FastAPI): the page, catalogue search, health and recommendations.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /recommend`` ``{"history": [titles or ids], "k": 10, "use_ci": null, "exclude_history": null}``
  (``use_ci`` null or absent: the ranking the run chose on validation; the answer's ``ranking`` says which)
  -> the generated text, the history matches and the top-k items (id, title, score, distance);
- ``GET /items?q=...&limit=20``: catalogue titles containing ``q`` (ignoring case);
- ``GET /health``: the run's description and batching statistics;
- ``GET /``: the page (``app/web/index.html``).

Requests are batched (:mod:`bigrec.app.batching`). Bad input is answered with 422 and a
``message`` naming the field (``history[2]: item id 99999 is not in the catalogue (ids
0..1681)``), besides FastAPI's usual ``detail`` list; a full queue with 503; a body over the
cap with 413 before it is read.
"""

import contextlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from bigrec.app.batching import Batcher, Busy
from bigrec.app.recommender import HistoryError
from bigrec.app.recommender import Query as RecQuery


@dataclass(frozen=True)
class Limits:
    """What the service accepts and how it batches (``bigrec serve``'s options of the same names)."""

    max_batch: int = 16
    batch_window_ms: float = 5.0
    max_queue: int = 1024
    max_history: int = 50
    max_k: int = 100
    max_title_length: int = 300
    max_body_bytes: int = 65536


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


class MatchOut(BaseModel):
    given: int | str
    id: int
    title: str
    how: str = Field(description="id, title, case (ignoring case) or nearest (embedding distance)")
    distance: float | None = None

class ItemOut(BaseModel):
    id: int
    title: str
    score: float = Field(description="ranking score, lower is better: the decoder's own items come first (likelihood: "
                                     "the negative log-probability, or of the blend with use_ci; constrained: the "
                                     "negative beam score), the rest by distance (re-weighted with use_ci)")
    distance: float | None = Field(description="L2 distance to the grounded text's embedding (null: not computed)")

class ScoredOut(BaseModel):
    id: int
    title: str
    score: float = Field(description="the model's score, higher is better")

class RecommendResponse(BaseModel):
    generated: str = Field(description="the top beam, cut at the end of its title, or the top title by likelihood")
    beams: list[str]
    grounded: str = Field(description="the text whose embedding ranked the items past the decoder's own (the top "
                                      "title, normalised)")
    history: list[MatchOut]
    items: list[ItemOut]
    use_ci: bool
    ranking: str = Field(description="which ranking this is and why")
    decoding: str = Field(description="free: generated, then grounded by distance; constrained: beams over the "
                                      "catalogue's titles; likelihood: titles by their log-probability")
    baselines: dict[str, list[ScoredOut]] | None = Field(None, description="with baselines: sasrec and "
                                                                           "popularity top k, where the run has them")
    batch_size: int = Field(description="requests that shared this generation call")

class CatalogItem(BaseModel):
    id: int
    title: str

class ErrorDetail(BaseModel):
    loc: list[int | str]
    msg: str
    type: str


class ErrorOut(BaseModel):
    message: str = Field(description="what was wrong, naming the field")
    detail: list[ErrorDetail] | None = None


# Every documented answer besides 200 (schemathesis checks that each status is documented).
ERRORS = {413: {"model": ErrorOut, "description": "request body over the size cap, refused before it is read"},
          422: {"model": ErrorOut, "description": "bad input (or a body that is not JSON); `message` names the field"}}


class ItemsResponse(BaseModel):
    query: str
    items: list[CatalogItem]


def recommend_request(limits: Limits, prompt_history: int) -> type[BaseModel]:
    """The request body's model: its bounds (history length, k, title length) are the service's limits."""
    max_title = limits.max_title_length

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
            min_length=1, max_length=limits.max_history,
            description=f"oldest first: catalogue ids or titles (at most {limits.max_history}; the prompt uses "
                        f"the latest {prompt_history}). A title not in the catalogue is matched to the nearest.")
        k: int = Field(10, ge=1, le=limits.max_k, description="how many items to return")
        use_ci: bool | None = Field(None, description="re-weight distances by the run's SASRec scores; null: the "
                                                      "ranking the run chose on validation")
        exclude_history: bool | None = Field(None, description="leave the history's items out; null: the run's "
                                                               "default (run.yaml exclude_history)")
        baselines: bool = Field(False, description="also SASRec's and popularity's top k for the same history")

    return RecommendRequest


def create_app(rec, limits: Limits | None = None):
    """The FastAPI application serving ``rec`` (a :class:`bigrec.app.recommender.Recommender`)."""
    limits = limits or Limits()
    max_title = limits.max_title_length
    RecommendRequest = recommend_request(limits, rec.max_history)  # noqa: N806
    batcher = Batcher(rec.recommend_queries, limits.max_batch, limits.batch_window_ms / 1000, limits.max_queue)

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
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    def unprocessable(errors: list[dict]) -> JSONResponse:
        return JSONResponse(status_code=422, content={"message": _message(errors), "detail": errors})

    @app.exception_handler(TooLarge)
    async def on_too_large(request: Request, exc: TooLarge) -> JSONResponse:
        return JSONResponse(status_code=413, content={"message": f"request body larger than {limits.max_body_bytes} "
                                                                 "bytes"}, headers={"connection": "close"})

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # the framework could not parse the body: bad input like any other
            return unprocessable([{"loc": ["body"], "msg": f"not a JSON object ({exc.detail})", "type": "json_invalid"}])
        return await http_exception_handler(request, exc)

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

    @app.get("/health", responses={413: ERRORS[413]})
    async def health() -> dict[str, Any]:
        """Liveness, the run's description and the batching statistics."""
        return {"status": "ok", "run": rec.describe(), "stats": batcher.stats.to_dict(batcher.queue.qsize())}

    @app.get("/items", response_model=ItemsResponse, responses=ERRORS)
    async def items(q: Annotated[str, Query(min_length=1, max_length=max_title, description="text to find")],
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
        """Catalogue items whose title contains ``q`` (ignoring case), titles starting with it first."""
        return {"query": q, "items": [{"id": i, "title": t} for i, t in rec.search(q, limit)]}

    @app.post("/recommend", response_model=RecommendResponse,
              responses={**ERRORS, 503: {"model": ErrorOut, "description": "too many requests waiting"}})
    async def recommend(body: RecommendRequest) -> Any:
        """Generate with beam search, ground the top generation to catalogue items, return the top k."""
        try:
            rec.check_history(body.history)
        except HistoryError as exc:
            loc = ["body", "history"] + ([exc.index] if exc.index is not None else [])
            return unprocessable([{"loc": loc, "msg": exc.reason, "type": "value_error"}])
        if body.use_ci and not rec.has_ci:
            return unprocessable([{"loc": ["body", "use_ci"], "type": "value_error", "msg": rec.ci_unavailable}])
        try:
            result = await batcher.submit(RecQuery(list(body.history), body.k, body.use_ci, body.exclude_history,
                                                   body.baselines))
        except Busy as exc:
            return JSONResponse(status_code=503, content={"message": str(exc)})
        out = result.to_dict()
        return {"generated": result.generated[0] if result.generated else "", "beams": result.generated,
                "grounded": result.grounded, "history": out["history"], "items": out["items"],
                "use_ci": result.use_ci, "ranking": result.ranking, "decoding": result.decoding,
                "baselines": out["baselines"],
                "batch_size": int(result.timing.get("batch", 1))}

    return app
