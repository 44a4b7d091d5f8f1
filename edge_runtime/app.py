"""The local HTTP app: POST /predict, GET /health, GET /experts (FastAPI, no torch).

Every request is bounded: bodies are read with a size limit while they stream (multipart
included, parsed only once the whole bounded body is in memory) and a time limit (408 for
a body that never arrives); image decoding and inference run in a small worker pool, and
requests beyond what it can queue get 503, so the event loop, and /health, stay free."""

from __future__ import annotations

import asyncio
import hmac
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from edge_runtime.bundle import BundleError
from edge_runtime.engine import Engine, InputError
from edge_runtime.images import MAX_BODY_BYTES, MAX_PIXELS, ImageError, decode_image
from hierarchy.decode import DecodeError, parse_decoder

# The OpenAPI description tells the truth about every request and answer, errors included,
# so schema-driven tools can test the service (tests/test_api_fuzz.py does).
ERROR_BODY = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
WHY = {400: "empty body, a malformed multipart body, or one without a 'file' part", 401: "no bearer token", 403: "wrong token",
       408: "the body did not arrive in time", 413: "body or image over the limits",
       415: "not a PNG or JPEG image", 422: "a corrupt image, an unsupported layout or an unknown decoder",
       500: "the bundle on disk is damaged", 503: "too many predictions waiting; see Retry-After"}
STRING_LIST = {"type": "array", "items": {"type": "string"}}
PREDICTION = {"type": "object", "required": ["leaf", "node", "path", "step_probs", "prob", "experts_evaluated", "decode",
                                             "subtree", "bundle_root"],
              "properties": {"leaf": {"type": "string"}, "node": {"type": "string"}, "path": STRING_LIST,
                             "step_probs": {"type": "array", "items": {"type": "number"}}, "prob": {"type": "number"},
                             "experts_evaluated": {"type": "integer"}, "decode": {"type": "string"},
                             "subtree": {"type": "boolean"}, "bundle_root": {"type": "string"}}}
IMAGE = {"type": "string", "format": "binary"}


def documented(ok: dict, *codes: int) -> dict:
    return {200: {"description": "OK", "content": {"application/json": {"schema": ok}}},
            **{c: {"description": WHY[c], "content": {"application/json": {"schema": ERROR_BODY}}} for c in codes}}


TRIM_AFTER_BYTES = 1 << 20   # a body this large may leave heap glibc keeps: hand it back after


def give_memory_back() -> None:
    """glibc's malloc_trim(0): free heap pages go back to the system (large bodies freed in a
    burst otherwise stay resident, raised mmap thresholds putting the next ones on the heap)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def resident_mb() -> float:
    import psutil
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def create_app(bundle: str | os.PathLike, memory_budget_mb: float | None = None, token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_pixels: int = MAX_PIXELS, threads: int = 1,
               decoder: str = "greedy", workers: int = 2, max_queued: int = 64,
               body_timeout: float = 30.0, pack: str | os.PathLike | None = None, mmap: bool = False,
               max_uploads: int = 8) -> FastAPI:
    """The app; at most ``max_uploads`` request bodies are held in memory at once (each up to
    ``max_body_bytes``): past that a prediction is answered 503 at once, before its body is read."""
    engine = Engine(bundle, memory_budget_mb=memory_budget_mb, threads=threads, pack=pack, mmap=mmap)
    parse_decoder(decoder)
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hmoe-predict")
    busy = [0]   # requests in the pool or waiting for it (the event loop is the only writer)
    uploading = [0]   # of those, the ones whose body is still arriving
    app = FastAPI(title="hmoe-edge", description="Hierarchical mixture-of-experts inference on this device.")
    app.state.engine = engine
    # a personalised bundle holds one subtree: every answer is a node inside it (the best one for
    # an input of another class), and says so
    subtree_of = engine.bundle.manifest.subtree_of
    scope = {"subtree": subtree_of is not None, "bundle_root": engine.tree.names[0]}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        what = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request ({what})"}, status_code=422)

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token; send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    async def read_limited(request: Request, limit: int) -> bytes:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise ImageError(f"body larger than the limit of {max_body_bytes} bytes", 413)
            return b"".join(chunks)
        finally:   # a failed read's chunks are not kept alive by the exception's traceback
            chunks.clear()

    async def read_image(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes + 64 * 1024:
            raise ImageError(f"body of {length} bytes; the limit is {max_body_bytes}", 413)
        try:   # the multipart envelope may add up to 64 KiB around the image
            body = await asyncio.wait_for(read_limited(request, max_body_bytes + 64 * 1024), body_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise ImageError(f"the body did not arrive within {body_timeout:g} s", 408) from None
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            if len(body) > max_body_bytes:
                raise ImageError(f"image larger than the limit of {max_body_bytes} bytes", 413)
            return body

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=4,
                                                             max_part_size=max_body_bytes)
        except HTTPException as exc:   # starlette's own refusals of a multipart body are 400s
            raise ImageError(f"malformed multipart body: {exc.detail}", 400) from None
        except Exception as exc:   # noqa: BLE001 - any parser failure is the body's fault, never a 500
            raise ImageError(f"malformed multipart body ({exc.__class__.__name__}: {str(exc)[:200]}); expected "
                             "multipart/form-data with a 'file' part holding a PNG or JPEG image", 400) from None
        part = form.get("file") or form.get("image")
        if part is None or isinstance(part, str):
            raise ImageError("multipart body without a 'file' (or 'image') part holding the image", 400)
        data = await part.read(max_body_bytes + 1)
        if len(data) > max_body_bytes:
            raise ImageError(f"image larger than the limit of {max_body_bytes} bytes", 413)
        return data

    def work(data: bytes, spec: str):
        x = decode_image(data, engine.bundle.input_spec, max_body_bytes, max_pixels)
        with lock:
            return engine.predict(x[None], spec)[0]

    @app.exception_handler(ImageError)
    async def _image_error(_request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/health", responses=documented({"type": "object"}))
    async def health(request: Request) -> dict:
        """Liveness for anyone (a monitor, systemd); what the bundle holds only with the token
        (when the server has one). No file path is ever shown."""
        try:
            authorize(request)
        except HTTPException:
            return {"status": "ok"}
        return {"status": "ok", "experts": len(engine.bundle.experts), "input": list(engine.bundle.input_spec.shape),
                **scope, "leaves": [engine.tree.names[v] for v in engine.tree.leaf_order]}

    @app.get("/experts", responses=documented({"type": "object"}, 401, 403))
    def experts(request: Request) -> dict:
        authorize(request)
        s = engine.stats
        return {"loaded": engine.loaded, "available": list(engine.entries), "hits": s.hits, "misses": s.misses,
                "evictions": s.evictions, "memory_budget_mb": memory_budget_mb, "resident_mb": resident_mb()}

    @app.post("/predict", responses=documented(PREDICTION, 400, 401, 403, 408, 413, 415, 422, 500, 503),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "image/png": {"schema": IMAGE}, "image/jpeg": {"schema": IMAGE},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {"file": IMAGE},
                                                     "required": ["file"]}}}}})
    async def predict(request: Request, decode: str | None = None) -> dict:
        authorize(request)
        spec = decode or decoder
        try:
            parse_decoder(spec)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if busy[0] >= workers + max_queued:
            raise HTTPException(503, f"busy: {busy[0]} predictions in progress; retry shortly",
                                headers={"Retry-After": "1"})
        if uploading[0] >= max_uploads:
            raise HTTPException(503, f"busy: {uploading[0]} images arriving; retry shortly",
                                headers={"Retry-After": "1"})
        busy[0] += 1
        declared = request.headers.get("content-length", "")
        big = not declared.isdigit() or int(declared) > TRIM_AFTER_BYTES
        try:
            uploading[0] += 1
            try:
                data = await read_image(request)
            finally:
                uploading[0] -= 1
                if big and uploading[0] == 0 and sys.exc_info()[0] is not None:
                    give_memory_back()   # the last large body of a burst failed to arrive
            pred = await asyncio.wrap_future(pool.submit(work, data, spec))
            del data
            if big and uploading[0] == 0:
                give_memory_back()
        except (InputError, DecodeError) as exc:
            raise HTTPException(422, str(exc)) from None
        except BundleError as exc:
            raise HTTPException(500, f"bundle problem: {exc}") from None
        finally:
            busy[0] -= 1
        return {**pred.to_dict(), "decode": spec, **scope}

    return app
