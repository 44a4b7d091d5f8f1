"""The coordinator's HTTP shell: parse requests, call ``Coordinator``, map its errors to statuses.

409 means only a stale or duplicate update (the device goes on with the next round),
422 only an invalid request; any other failure is a 500, which a device retries.
Devices authenticate with their own token; ``/status``, ``/docs`` and ``/openapi.json``
need the operator's token; ``/health`` (liveness) and ``/enroll`` need none.
Blocking work (SQLite commits, fsyncs, aggregation) runs in the coordinator's writer
thread, never on the event loop, which awaits its result without holding a thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from concurrent.futures import Future

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from trainer.transports.coordinator.admission import AdmissionError
from trainer.transports.coordinator.service import (
    Coordinator,
    InvalidUpdate,
    StaleUpdate,
)

MAX_JSON_BYTES = 4096
BODY_SECONDS = 30.0      # a request body must arrive within this (else 408 and the connection closes)
MAX_INT = 2**31 - 1      # rounds, versions and sample counts in headers and queries
UPDATE_HEADERS = ("X-Round, X-Expert, X-Base-Version, X-Samples, X-Idempotency-Key, X-Hyperparameters, and "
                  "optional X-Client-Samples and X-Metrics")

# The OpenAPI description tells the truth about every request and answer, errors included,
# so schema-driven tools can test the service (tests/test_api_fuzz.py does).
ERROR_BODY = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
WHY = {401: "no bearer token", 403: "wrong secret or token, a revoked device, or the fleet is full",
       404: "unknown expert", 408: "the body did not arrive in time",
       409: "a stale or duplicate update, or an idempotency key already used for another round",
       413: "body over the limit", 422: "an invalid request; the detail says what was wrong",
       429: "too many enrolments, or too many wrong secrets from this address; see Retry-After"}


def errors(*codes: int) -> dict:
    return {c: {"description": WHY[c], "content": {"application/json": {"schema": ERROR_BODY}}} for c in codes}


def ok(schema: dict, media: str = "application/json") -> dict:
    return {200: {"description": "OK", "content": {media: {"schema": schema}}}}


def obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props)}


INT, STR, NUM = {"type": "integer"}, {"type": "string"}, {"type": "number"}
ASSIGNMENT = obj(round=INT, expert=STR, weights_version=INT, deadline={"type": ["number", "null"]},
                 planned={"type": "boolean"}, children={"type": "array", "items": STR},
                 seed={"type": ["integer", "null"]}, hyperparameters={"type": ["object", "null"]},
                 samples={"type": ["integer", "null"]}, excused={"type": ["string", "null"]},
                 wait={"type": ["string", "null"]},
                 trunk={"type": ["object", "null"], "description": "for an expert on the shared trunk: the expert "
                        "whose weights hold the trunk, and their version (GET /weights/{expert} serves them)",
                        "properties": {"expert": STR, "version": INT}})
UPDATE_PARAMETERS = [
    {"name": name, "in": "header", "required": required, "schema": schema, "description": text}
    for name, required, schema, text in (
        ("X-Round", True, INT, "the round the update was trained for"),
        ("X-Expert", True, STR, "the round's expert"),
        ("X-Base-Version", True, INT, "the weights version it started from"),
        ("X-Samples", True, {"type": "integer", "minimum": 1}, "samples under the expert it trained on"),
        ("X-Client-Samples", False, {"type": "integer", "minimum": 1}, "all of the device's samples"),
        ("X-Hyperparameters", True, STR, "JSON object: the hyper-parameters it trained with"),
        ("X-Idempotency-Key", True, STR, "1 to 128 characters; the same key twice counts once"),
        ("X-Metrics", False, STR, "JSON object of the device's own figures"))]


async def read_body(request: Request, limit: int, seconds: float = BODY_SECONDS) -> bytes:
    """The body, refused with 413 as soon as it is larger than ``limit`` (declared or streamed),
    and with 408 when it has not all arrived within ``seconds``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"body of {length} bytes; the limit is {limit}")
    chunks, size = [], 0

    async def stream() -> None:
        nonlocal size
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body larger than the limit of {limit} bytes")

    try:
        async with asyncio.timeout(seconds):
            await stream()
    except (asyncio.TimeoutError, TimeoutError):
        raise HTTPException(408, f"the body did not arrive within {seconds:g} s",
                            headers={"Connection": "close"}) from None
    return b"".join(chunks)


def bounded_int(text: str, name: str, least: int = 0) -> int:
    """A header's or query's integer in [least, 2^31 - 1], or a 422 that names it."""
    if not isinstance(text, str) or not (text.isascii() and text.isdigit() and len(text) <= 20):
        # strict: int() would also take '1_0', ' 10 ' and other digits than 0-9
        raise HTTPException(422, f"{name} {str(text)[:40]!r} is not an integer; expected decimal digits 0-9 only")
    value = int(text)
    if not least <= value <= MAX_INT:
        raise HTTPException(422, f"{name} {str(text)[:40]} is out of range; expected {least} to {MAX_INT}")
    return value


def parse_json(text: str | bytes, what: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:   # RecursionError: nested too deep to be a real request
        raise HTTPException(422, f"{what} is not valid JSON ({exc.__class__.__name__})") from None


def create_app(coord: Coordinator, max_update_bytes: int | None = None, operator_token: str | None = None,
               body_seconds: float = BODY_SECONDS) -> FastAPI:
    """The HTTP shell. ``max_update_bytes`` (default: ``coord.max_update_bytes()``, from the
    largest expert's own size); ``operator_token`` guards /status and the API docs (None: they
    are not served)."""
    app = FastAPI(title="hmoe coordinator", description="Federated rounds over HTTP; every decision is the "
                  "run's strategy's, as in the simulation. Devices send 'Authorization: Bearer <device token>' "
                  "(from POST /enroll); /status and these docs need the operator's token; /enroll and /health "
                  "need none.", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.coordinator = coord
    max_update_bytes = coord.max_update_bytes() if max_update_bytes is None else max_update_bytes

    def operator(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token: this needs the operator's token",
                                headers={"WWW-Authenticate": "Bearer"})
        if operator_token is None or not hmac.compare_digest(header[7:].strip().encode(), operator_token.encode()):
            raise HTTPException(403, "this needs the operator's token")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        what = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request ({what})"}, status_code=422)

    def device(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token; enrol with POST /enroll",
                                headers={"WWW-Authenticate": "Bearer"})
        found = coord.device_for(header[7:].strip())
        if found is None:
            raise HTTPException(403, "unknown device token")
        if coord.revoked(found):
            raise HTTPException(403, f"device {found} was revoked by the operator")
        return found

    async def call(fn, *args, **kwargs):
        """``fn`` either answers at once or returns a future the writer thread completes: the
        event loop waits for it without holding a thread."""
        try:
            out = fn(*args, **kwargs)
            return await coord.awaitable(out) if isinstance(out, Future) else out
        except StaleUpdate as exc:
            raise HTTPException(409, str(exc)) from None
        except InvalidUpdate as exc:
            raise HTTPException(422, str(exc)) from None

    @app.post("/enroll", responses={**ok(obj(device_id=STR, token=STR, index=INT)), **errors(403, 413, 422, 429)},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "properties": {"secret": STR, "name": STR}, "required": ["secret"]}}}}})
    async def enroll(request: Request) -> JSONResponse:
        body = parse_json(await read_body(request, MAX_JSON_BYTES, min(body_seconds, 10.0)), "the body")
        if not isinstance(body, dict) or not isinstance(body.get("secret"), str):
            raise HTTPException(422, "expected JSON {\"secret\": \"...\", \"name\": \"...\"}")
        peer = request.client.host if request.client else "unknown"
        try:
            return JSONResponse(await call(coord.enroll_later, body["secret"], str(body.get("name", ""))[:100],
                                           peer))
        except AdmissionError as exc:
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
            raise HTTPException(exc.status, str(exc), headers=headers) from None

    @app.get("/assignment", responses={**ok(ASSIGNMENT), **errors(401, 403, 409, 422)})
    async def assignment(request: Request, counts: str | None = None, subtree: str | None = None) -> JSONResponse:
        """``counts``: the device's samples per label, comma-separated in the hierarchy's leaf order
        (recorded; the round is planned once enough devices have sent theirs: until then the
        answer has ``wait``); ``subtree``: the node a personalised device carries (it is excused
        from other experts' rounds). Answered from memory; recording new counts and excusing a
        device write through the writer thread."""
        dev = device(request)
        leaf_counts = None
        if counts is not None:
            parts = counts.split(",")
            if len(parts) > coord.tree.num_leaves or any(len(c.strip()) > 12 for c in parts):
                raise HTTPException(422, f"counts must be {coord.tree.num_leaves} comma-separated integers, one per "
                                    f"leaf, each at most {coord.limits.max_samples}")
            leaf_counts = [bounded_int(c.strip(), "a label count") for c in parts]
        if coord.due():
            await run_in_threadpool(coord.tick)
        now = coord.answer_now(dev, leaf_counts, subtree)   # the common case: a poll that changes nothing
        if now is not None:
            return JSONResponse(now)
        try:
            return JSONResponse(await run_in_threadpool(coord.assignment, dev, leaf_counts, True, subtree))
        except InvalidUpdate as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/manifest", responses={**ok({"type": "object"}), **errors(401, 403)})
    async def manifest(request: Request) -> JSONResponse:
        device(request)
        return JSONResponse(coord.manifest())

    @app.get("/weights/{expert}", responses={**ok({"type": "string", "format": "binary"}, "application/octet-stream"),
                                             **errors(401, 403, 404, 422)}, response_class=Response)
    async def weights(expert: str, request: Request) -> Response:
        device(request)
        if expert not in coord.tasks:
            raise HTTPException(404, f"unknown expert {expert!r}; experts are {', '.join(coord.tasks)}")
        version, data, digest = coord.current_weights(expert, with_digest=True)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Weights-Version": str(version), "X-Expert": expert, "X-Weights-SHA256": digest})

    @app.post("/update", responses={**ok(obj(accepted={"type": "boolean"}, duplicate={"type": "boolean"}, round=INT,
                                                expert=STR)), **errors(401, 403, 409, 413, 422)},
              openapi_extra={"parameters": UPDATE_PARAMETERS, "requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def update(request: Request) -> JSONResponse:
        dev = device(request)
        h = dict(request.headers)   # one pass over the raw headers, then O(1) lookups
        try:
            expert, key, hp = h["x-expert"], h["x-idempotency-key"], h["x-hyperparameters"]
            rnd, base = bounded_int(h["x-round"], "X-Round"), bounded_int(h["x-base-version"], "X-Base-Version")
            samples = bounded_int(h["x-samples"], "X-Samples", 1)
        except KeyError as exc:
            raise HTTPException(422, f"missing update header {exc}; expected {UPDATE_HEADERS}") from None
        client_samples = bounded_int(h["x-client-samples"], "X-Client-Samples", 1) if "x-client-samples" in h \
            else None
        if expert not in coord.tasks:
            raise HTTPException(422, f"unknown expert {expert[:100]!r}; experts are {', '.join(coord.tasks)}")
        body = await read_body(request, min(max_update_bytes, coord.max_update_bytes(expert)), body_seconds)
        metrics = parse_json(h.get("x-metrics", "{}"), "X-Metrics")
        hp = parse_json(hp, "X-Hyperparameters")
        if not isinstance(metrics, dict) or not isinstance(hp, dict):
            raise HTTPException(422, "X-Metrics and X-Hyperparameters must be JSON objects")
        return JSONResponse(await call(coord.submit_later, dev, rnd, expert, base, samples, key, metrics, body, hp,
                                       client_samples))

    @app.post("/decline", responses={**ok(obj(excused={"type": "boolean"}, round=INT)), **errors(401, 403, 409, 422)})
    async def decline(request: Request, round: str, reason: str = "declined") -> dict:
        """The device sends nothing this round (for example: its local training diverged)."""
        dev = device(request)
        round = bounded_int(round, "round")
        await call(coord.excuse_later, dev, round, reason[:200])
        return {"excused": True, "round": round}

    @app.get("/status", responses={**ok({"type": "object"}), **errors(401, 403)})
    async def status(request: Request) -> dict:
        """The rounds, as far as they went (the operator's token)."""
        operator(request)
        await run_in_threadpool(coord.tick)
        return await run_in_threadpool(coord.status)

    @app.get("/health", responses=ok(obj(status=STR)))
    async def health() -> dict:
        """Liveness, for anyone: nothing about the run."""
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        operator(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        """Swagger UI; it fetches /openapi.json, so a browser needs the operator's token sent by a
        proxy or an extension (curl -H 'Authorization: Bearer ...' /openapi.json works anywhere)."""
        operator(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="hmoe coordinator")

    return app
