"""The coordinator's HTTP shell: parse requests, call ``Coordinator``, map its errors to statuses.

409 means only a stale or duplicate update (the device goes on with the next round),
422 only an invalid request; any other failure is a 500, which a device retries.
Blocking work (SQLite commits, fsyncs, aggregation) runs in the thread pool, never on
the event loop.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from trainer.coordinator import (
    MAX_UPDATE_BYTES,
    Coordinator,
    InvalidUpdate,
    StaleUpdate,
)

MAX_JSON_BYTES = 4096
UPDATE_HEADERS = ("X-Round, X-Expert, X-Base-Version, X-Samples, X-Idempotency-Key, X-Hyperparameters, and "
                  "optional X-Client-Samples and X-Metrics")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is larger than ``limit`` (declared or streamed)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"body of {length} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body larger than the limit of {limit} bytes")
    return bytes(body)


def parse_json(text: str | bytes, what: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:   # RecursionError: nested too deep to be a real request
        raise HTTPException(422, f"{what} is not valid JSON ({exc.__class__.__name__})") from None


def create_app(coord: Coordinator, max_update_bytes: int = MAX_UPDATE_BYTES) -> FastAPI:
    app = FastAPI(title="hmoe coordinator", description="Federated rounds over HTTP; every decision is the "
                  "run's strategy's, as in the simulation.")
    app.state.coordinator = coord

    def device(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token; enrol with POST /enroll",
                                headers={"WWW-Authenticate": "Bearer"})
        found = coord.device_for(header[7:].strip())
        if found is None:
            raise HTTPException(403, "unknown device token")
        return found

    async def call(fn, *args, **kwargs):
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except StaleUpdate as exc:
            raise HTTPException(409, str(exc)) from None
        except InvalidUpdate as exc:
            raise HTTPException(422, str(exc)) from None

    @app.post("/enroll")
    async def enroll(request: Request) -> dict:
        body = parse_json(await read_body(request, MAX_JSON_BYTES), "the body")
        if not isinstance(body, dict) or not isinstance(body.get("secret"), str):
            raise HTTPException(422, "expected JSON {\"secret\": \"...\", \"name\": \"...\"}")
        try:
            return await run_in_threadpool(coord.enroll, body["secret"], str(body.get("name", ""))[:100])
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None

    @app.get("/assignment")
    async def assignment(request: Request, counts: str | None = None) -> dict:
        """``counts``: the device's samples per label, comma-separated in the hierarchy's leaf order."""
        dev = device(request)
        leaf_counts = None
        if counts is not None:
            try:
                leaf_counts = [int(c) for c in counts.split(",")]
            except ValueError:
                raise HTTPException(422, "counts must be comma-separated integers, one per leaf") from None
        return await call(coord.assignment, dev, leaf_counts)

    @app.get("/manifest")
    def manifest(request: Request) -> dict:
        device(request)
        return coord.manifest()

    @app.get("/weights/{expert}")
    def weights(expert: str, request: Request) -> Response:
        device(request)
        if expert not in coord.tasks:
            raise HTTPException(404, f"unknown expert {expert!r}; experts are {', '.join(coord.tasks)}")
        with coord.lock:
            version = coord.version(expert)
            path = coord.weights_file(expert, version)
        return Response(path.read_bytes(), media_type="application/octet-stream",
                        headers={"X-Weights-Version": str(version), "X-Expert": expert})

    @app.post("/update")
    async def update(request: Request) -> dict:
        dev = device(request)
        body = await read_body(request, max_update_bytes)
        h = request.headers
        try:
            rnd, base, samples = int(h["x-round"]), int(h["x-base-version"]), int(h["x-samples"])
            client_samples = int(h["x-client-samples"]) if "x-client-samples" in h else None
            expert, key, hp = h["x-expert"], h["x-idempotency-key"], h["x-hyperparameters"]
        except (KeyError, ValueError) as exc:
            raise HTTPException(422, f"bad or missing update headers ({exc}); expected {UPDATE_HEADERS}") from None
        metrics = parse_json(h.get("x-metrics", "{}"), "X-Metrics")
        hp = parse_json(hp, "X-Hyperparameters")
        if not isinstance(metrics, dict) or not isinstance(hp, dict):
            raise HTTPException(422, "X-Metrics and X-Hyperparameters must be JSON objects")
        return await call(coord.submit, dev, rnd, expert, base, samples, key, metrics, body, hp, client_samples)

    @app.post("/decline")
    async def decline(request: Request, round: int, reason: str = "declined") -> dict:
        """The device sends nothing this round (for example: its local training diverged)."""
        dev = device(request)
        await call(coord.excuse, dev, round, reason)
        return {"excused": True, "round": round}

    @app.get("/status")
    async def status() -> dict:
        await run_in_threadpool(coord.tick)
        return await run_in_threadpool(coord.status)

    return app
