"""The local HTTP app: POST /predict, GET /health, GET /experts (FastAPI, no torch)."""

from __future__ import annotations

import hmac
import os
import threading

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from edge_runtime.bundle import BundleError
from edge_runtime.engine import Engine, InputError
from edge_runtime.images import MAX_BODY_BYTES, MAX_PIXELS, ImageError, decode_image
from hierarchy.decode import DecodeError, parse_decoder


def resident_mb() -> float:
    import psutil
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def create_app(bundle: str | os.PathLike, memory_budget_mb: float | None = None, token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_pixels: int = MAX_PIXELS, threads: int = 1,
               decoder: str = "greedy") -> FastAPI:
    engine = Engine(bundle, memory_budget_mb=memory_budget_mb, threads=threads)
    parse_decoder(decoder)
    lock = threading.Lock()
    app = FastAPI(title="hmoe-edge", description="Hierarchical mixture-of-experts inference on this device.")
    app.state.engine = engine

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token; send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    async def read_image(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes + 64 * 1024:
            raise ImageError(f"body of {length} bytes; the limit is {max_body_bytes}", 413)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4, max_part_size=max_body_bytes)
            part = form.get("file") or form.get("image")
            if part is None or isinstance(part, str):
                raise ImageError("multipart body without a 'file' (or 'image') part holding the image", 400)
            data = await part.read(max_body_bytes + 1)
        else:
            data = b""
            async for chunk in request.stream():
                data += chunk
                if len(data) > max_body_bytes:
                    break
        if len(data) > max_body_bytes:
            raise ImageError(f"image larger than the limit of {max_body_bytes} bytes", 413)
        return data

    @app.exception_handler(ImageError)
    async def _image_error(_request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "bundle": str(engine.bundle.root), "experts": len(engine.bundle.experts),
                "input": list(engine.bundle.input_spec.shape)}

    @app.get("/experts")
    def experts(request: Request) -> dict:
        authorize(request)
        s = engine.stats
        return {"loaded": engine.loaded, "available": list(engine.entries), "hits": s.hits, "misses": s.misses,
                "evictions": s.evictions, "memory_budget_mb": memory_budget_mb, "resident_mb": resident_mb()}

    @app.post("/predict")
    async def predict(request: Request, decode: str | None = None) -> dict:
        authorize(request)
        spec = decode or decoder
        try:
            parse_decoder(spec)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        x = decode_image(await read_image(request), engine.bundle.input_spec, max_body_bytes, max_pixels)
        try:
            with lock:
                pred = engine.predict(x[None], spec)[0]
        except (InputError, DecodeError) as exc:
            raise HTTPException(422, str(exc)) from None
        except BundleError as exc:
            raise HTTPException(500, f"bundle problem: {exc}") from None
        return {**pred.to_dict(), "decode": spec}

    return app
