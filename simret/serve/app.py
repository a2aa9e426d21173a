"""The search service: ``create_app(index_dir)`` → a FastAPI (ASGI) application over an index directory.

Routes (JSON unless said otherwise; errors are ``{"error": "..."}`` with 400/401/404/413/415/503):

    GET  /health                      {"status", "count", "fingerprint", "generation", "attention", "classify"}
                                      (no token)
    POST /search?k=&bbox=&qe=&alpha=  multipart field ``image`` → {"query", "ids", "scores"}, as
                                      ``simret search DIR IMAGE --format jsonl``
    GET  /search?id=ID&k=             "more like this" from the stored descriptor of an indexed image
    GET  /images/{id}                 the indexed image file (ids of the index, inside its root only)
    GET  /thumbnails/{id}?size=256    JPEG thumbnail (cached)
    GET  /attention?id=ID             SimPool attention overlay (PNG) of an indexed image
    POST /attention                   the same for an uploaded image (multipart field ``image``)
    POST /classify?top=3              with a support set (``support=``): multipart field ``image`` →
                                      {"image", "class", "score", "top", "method"}, as
                                      ``simret classify SUPPORT_DIR IMAGE --format jsonl``; else 404
    GET  /metrics                     Prometheus text
    GET  /docs, /openapi.json         the framework's API page
    GET  /                            the search page (simret/serve/static)
"""
from __future__ import annotations

import asyncio
import io
import math
import mimetypes
import os
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from simret.serve.batcher import ImageRejected, MicroBatcher, QueueFull
from simret.serve.classify import DEFAULT_TOP, OFF_MESSAGE, SupportSet, load_support_set
from simret.serve.files import THUMBNAIL_SIZES, ThumbnailCache, indexed_file
from simret.serve.metrics import CONTENT_TYPE, Metrics
from simret.serve.state import IndexHolder, LoadedIndex, Poller, load_index
from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
STATIC = Path(__file__).parent / "static"
ATTENTION_MAX_SIZE = 512  # long side of the image the attention overlay is computed on (at most)


class ApiError(Exception):
    """An answer other than 200: ``status`` and a message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def rejection_status(reason: str) -> int:
    """HTTP status of an image ``extract`` could not use: a box off the image or an image too small for
    the model is a bad request (400); an image over the pixel guard is 413; anything else is not a usable
    image (415)."""
    if "crop box" in reason or reason.startswith("the model cannot process"):
        return 400
    if reason.startswith("too large"):
        return 413
    return 415


def check_upload(path: Path) -> None:
    """A cheap look at an uploaded file (header only): an image within the pixel guards, or ``ApiError``.

    The guards are ``load_image``'s: PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, which
    ``load_image`` treats as an error) and ``MAX_PIXELS``. Checked by size, not by turning warnings into
    errors: ``warnings.catch_warnings`` is not thread-safe, and uploads are checked on several threads.
    """
    from PIL import Image, UnidentifiedImageError

    from simret.data.images import MAX_PIXELS

    try:
        with Image.open(path) as handle:  # PIL warns (once) over its limit, and refuses past twice that
            width, height = handle.size
    except UnidentifiedImageError:
        raise ApiError(415, "not an image (unrecognised format): upload a JPEG, PNG, WebP … file") from None
    except Image.DecompressionBombError:
        raise ApiError(413, "image too large (decompression bomb guard)") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types on malformed headers
        raise ApiError(415, f"not a readable image ({type(err).__name__}: {str(err)[:120]})") from None
    bomb_limit = Image.MAX_IMAGE_PIXELS or MAX_PIXELS
    if width * height > min(bomb_limit, MAX_PIXELS):
        raise ApiError(413, f"image too large ({width}x{height} pixels; decompression bomb guard)")


class SearchService:
    """What the routes share: the current index generation, the model thread, caches and metrics."""

    def __init__(self, index_dir: PathLike, encoder: Any, device: Any, *, batch_size: int, batch_wait: float,
                 max_queue: int, reload_interval: float, threads: int, rerank: Optional[int], max_k: int,
                 thumbnail_cache_mb: float, support: Optional[SupportSet] = None) -> None:
        from simret.retrieval.queries import describe_queries

        self.path = Path(index_dir).expanduser()
        self.encoder = encoder.eval()
        self.device = device
        self.max_k = max_k
        self.metrics = Metrics()
        self.holder = IndexHolder(self.path, lambda: load_index(self.path, encoder.fingerprint, rerank=rerank))
        self.poller = Poller(self.holder, reload_interval)
        self.reload_interval = reload_interval
        self.support = support

        def describe(paths: List[str], boxes: List[Any], meta: Dict[str, Any]):
            return describe_queries(encoder, meta, paths, boxes=boxes if any(b is not None for b in boxes) else None,
                                    batch_size=len(paths), workers=0, device=device)

        self.batcher = MicroBatcher(describe, embed=support.embed if support is not None else None,
                                    max_batch=batch_size, max_wait=batch_wait, max_queue=max_queue,
                                    on_batch=self.metrics.batch)
        self.thumbnails = ThumbnailCache(int(thumbnail_cache_mb * 2 ** 20))
        self.threads = threads
        self._limiter = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.has_attention = hasattr(getattr(encoder, "pool", None), "attention")
        self.metrics.gauge("simret_queue_depth", "Query images waiting for the model thread.",
                           lambda: self.batcher.depth)
        self.metrics.gauge("simret_index_images", "Images in the generation being served.",
                           lambda: self.holder.current.count)
        self.metrics.gauge("simret_reloads_total", "Generations swapped in since the start.",
                           lambda: self.holder.reloads)
        self.metrics.gauge("simret_thumbnail_cache_hits_total", "Thumbnails answered from the cache.",
                           lambda: self.thumbnails.hits)
        self.metrics.gauge("simret_classify_classes", "Classes of the support set /classify answers with (0: off).",
                           lambda: self.support.n_classes if self.support is not None else 0)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.batcher.start()
        self.poller.start()  # polls every reload_interval seconds (0: waits for SIGHUP only)

    def stop(self) -> None:
        self.poller.stop()
        self.batcher.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ------------------------------------------------------------------ blocking work, off the event loop

    async def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the worker threads (``--workers`` of them)."""
        import functools

        import anyio

        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._limiter)

    def _save(self, source) -> Path:
        if self._tmp is None:  # uploads wait here until described (removed after each request and at stop)
            self._tmp = tempfile.TemporaryDirectory(prefix="simret-serve-")
        handle, name = tempfile.mkstemp(dir=self._tmp.name, suffix=".upload")
        with os.fdopen(handle, "wb") as out:
            source.seek(0)
            shutil.copyfileobj(source, out)
        path = Path(name)
        try:
            check_upload(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    async def save_upload(self, upload) -> Path:
        """The uploaded image in a temporary file (the caller removes it), after ``check_upload``."""
        return await self.run(self._save, upload.file)

    async def describe(self, path: Path, box, loaded: LoadedIndex):
        """Raw descriptor ``(1, D)`` of an image file, through the micro-batching model thread."""
        return await self._queued(lambda: self.batcher.describe_image(str(path), box, loaded.meta))

    async def embed(self, path: Path):
        """Feature ``(1, D)`` of an image file to classify (as the support set's are made), through the
        micro-batching model thread."""
        return await self._queued(lambda: self.batcher.embed_image(str(path)))

    @staticmethod
    async def _queued(submit):
        """Await the future ``submit()`` puts on the model's queue: a full queue is 503, an unusable image
        400/413/415 (``rejection_status``)."""
        try:
            future = submit()
        except QueueFull as err:
            raise ApiError(503, str(err), {"Retry-After": "1"}) from None
        try:
            return await asyncio.wrap_future(future)
        except ImageRejected as err:
            raise ApiError(rejection_status(err.reason), f"the image cannot be used: {err.reason}") from None

    async def attention_png(self, path: Path) -> bytes:
        if not self.has_attention:
            pool = getattr(self.encoder, "config", {}).get("pool", "?")
            raise ApiError(400, f"attention maps need SimPool pooling; this index's encoder pools with {pool!r}")
        max_size = min(self.holder.current.meta.get("max_size") or ATTENTION_MAX_SIZE, ATTENTION_MAX_SIZE)

        def render() -> bytes:
            from simret.visualize import attention_maps, render_overlay

            (result,) = attention_maps(self.encoder, [path], max_size=max_size, device=self.device)
            buffer = io.BytesIO()
            render_overlay(result.image, result.map, side_by_side=False).save(buffer, format="PNG")
            return buffer.getvalue()

        try:
            future = self.batcher.call(render)
        except QueueFull as err:
            raise ApiError(503, str(err), {"Retry-After": "1"}) from None
        from simret.data.images import ImageReadError

        try:
            return await asyncio.wrap_future(future)
        except ImageReadError as err:
            raise ApiError(rejection_status(err.reason), f"the image cannot be used: {err.reason}") from None


def check_search_params(loaded: LoadedIndex, k: int, qe: int, alpha: float, max_k: int) -> None:
    """The checks ``simret search`` makes on -k, --qe and --alpha, as 400s."""
    if not 1 <= k <= max_k:
        raise ApiError(400, f"k must be from 1 to {max_k}, got {k}")
    if not 0 <= qe <= loaded.count:
        raise ApiError(400, f"qe must be from 0 (off) to the {loaded.count} images of the index, got {qe}")
    if not (0 <= alpha and math.isfinite(alpha)):
        raise ApiError(400, f"alpha must be a finite number ≥ 0, got {alpha:g}")


def create_app(index_dir: PathLike, *, encoder: Any = None, device: Any = None, token: Optional[str] = None,
               cors: Optional[List[str]] = None, batch_size: int = 16, batch_wait_ms: float = 5.0,
               max_upload_mb: float = 20.0, max_queue: int = 256, reload_interval: float = 2.0,
               threads: Optional[int] = None, rerank: Optional[int] = None, max_k: int = 1000,
               thumbnail_cache_mb: float = 64.0, support: Any = None, support_method: Optional[str] = None,
               base_mean: Any = None):
    """The ASGI application serving the index directory ``index_dir`` (loaded now, in full).

    Args:
        index_dir: a directory written by ``simret index``.
        encoder: the encoder that describes query images (default: built from the index's ``meta.json``
            model record, like ``simret search`` does); its fingerprint must be the index's.
        device: where a default encoder runs (``auto``, ``cpu``, ``cuda:N`` …).
        token: when set, every route but ``/health`` needs ``Authorization: Bearer TOKEN``.
        cors: origins allowed to call the API from a browser page of another origin (default: none).
        batch_size: most query images described in one forward pass (1: no micro-batching).
        batch_wait_ms: how long the model thread waits for more queries once one has arrived.
        max_upload_mb: largest request body; larger uploads are refused with 413.
        max_queue: most query images waiting for the model; more are refused with 503.
        reload_interval: seconds between polls of the index's generation (0: reload on SIGHUP only).
        threads: threads for file, thumbnail and index work (default: min(8, CPUs + 4)).
        rerank: ivfpq re-scoring depth (default: the index's, as ``simret search``).
        max_k: largest ``k`` a request may ask for.
        thumbnail_cache_mb: memory for cached thumbnails.
        support: adds ``POST /classify``: a folder of examples (``<dir>/<class>/<images>``, as for ``simret
            classify``; its features are extracted now with ``encoder``, or read from the cache) or a
            ``simret.classify.SupportClassifier`` made with an encoder of the same fingerprint.
        support_method: ``protonet`` (default), ``cosine``, ``simpleshot`` or ``logreg`` (a support folder only).
        base_mean: for ``simpleshot``/``logreg`` (CL2N): a ``(D,)`` array, a ``.npy`` file or a feature bank
            ``.h5`` (a support folder only).

    Raises:
        ValueError, FileNotFoundError: no searchable index in ``index_dir``, or an encoder of another
            fingerprint; a bad support folder, method or base mean.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    if encoder is None:
        encoder, device = _encoder_from_meta(index_dir, device)
    elif device is None:
        parameter = next(encoder.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
    if support is None and (support_method is not None or base_mean is not None):
        raise ValueError("support_method and base_mean need a support set (support=...)")
    support_set = None if support is None else load_support_set(encoder, device, support, method=support_method,
                                                                 base_mean=base_mean)
    service = SearchService(index_dir, encoder, device, batch_size=batch_size, batch_wait=batch_wait_ms / 1000,
                            max_queue=max_queue, reload_interval=reload_interval,
                            threads=threads or min(8, (os.cpu_count() or 1) + 4),
                            rerank=rerank, max_k=max_k,
                            thumbnail_cache_mb=thumbnail_cache_mb, support=support_set)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="simret serve", version=_version(), lifespan=lifespan,
                  description=f"Image search over the index {service.path}. Errors are JSON "
                              f'{{"error": "..."}}.')
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    _add_middleware(app, service, token=token, cors=cors, max_bytes=int(max_upload_mb * 2 ** 20))
    return app


def _version() -> str:
    from simret import __version__

    return __version__


def _encoder_from_meta(index_dir: PathLike, device: Any):
    """The index's encoder (its meta.json model record), prepared for inference at the precision
    ``simret search`` uses by default (``$SIMRET_PRECISION``, else ``auto``), never compiled (a server's first
    queries must not wait)."""
    from simret.models.encoder import create_encoder_from_spec
    from simret.models.runtime import prepare_for_inference
    from simret.retrieval.indexdir import read_meta
    from simret.utils.devices import resolve_device

    device = resolve_device(device or "auto")
    encoder = create_encoder_from_spec(read_meta(index_dir).get("model", {})).to(device)
    precision = os.environ.get("SIMRET_PRECISION", "auto")
    return prepare_for_inference(encoder, precision, device, compile="off"), device


# ---------------------------------------------------------------------------------------- routes


def _add_routes(app: FastAPI, service: SearchService) -> None:
    from simret.retrieval.queries import parse_box

    @app.get("/health", summary="Liveness and what is served (never needs a token)")
    async def health() -> Dict[str, Any]:
        loaded = service.holder.current
        return {"status": "ok", "count": loaded.count, "fingerprint": loaded.index_dir.fingerprint,
                "generation": loaded.generation, "attention": service.has_attention,
                "classify": service.support.health() if service.support is not None else None}

    @app.post("/search", summary="Search with an uploaded image (as simret search DIR IMAGE --format jsonl)")
    async def search_upload(image: UploadFile = File(..., description="the query image"),
                            k: int = Query(10, description="results"),
                            bbox: Optional[str] = Query(None, description="x1,y1,x2,y2: crop the query first (pixels)"),
                            qe: int = Query(0, description="α-query expansion over the top qe results (0: off)"),
                            alpha: float = Query(3.0, description="similarity exponent of qe")) -> Dict[str, Any]:
        loaded = service.holder.current
        check_search_params(loaded, k, qe, alpha, service.max_k)
        try:
            box = parse_box(bbox)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        path = await service.save_upload(image)
        try:
            raw = await service.describe(path, box, loaded)
        finally:
            path.unlink(missing_ok=True)
        ids, scores = await service.run(loaded.search, raw, k, qe=qe, alpha=alpha)
        return {"query": image.filename or "upload", "ids": ids, "scores": [round(s, 6) for s in scores]}

    @app.get("/search", summary="More like this: search with the stored descriptor of an indexed image")
    async def search_id(id: str = Query(..., description="an id of the index"),  # noqa: A002 - the API's name
                        k: int = Query(10, description="results"),
                        qe: int = Query(0, description="α-query expansion over the top qe results (0: off)"),
                        alpha: float = Query(3.0, description="similarity exponent of qe")) -> Dict[str, Any]:
        loaded = service.holder.current
        check_search_params(loaded, k, qe, alpha, service.max_k)
        raw = loaded.stored_descriptor(id)
        if raw is None:
            raise ApiError(404, f"no image {id!r} in the index")
        ids, scores = await service.run(loaded.search, raw, k, qe=qe, alpha=alpha)
        return {"query": id, "ids": ids, "scores": [round(s, 6) for s in scores]}

    @app.get("/images/{image_id:path}", summary="An indexed image file", response_class=FileResponse)
    async def image_file(image_id: str):
        path = await service.run(indexed_file, service.holder.current, image_id)
        if path is None:
            raise ApiError(404, f"no image {image_id!r} in the index")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/thumbnails/{image_id:path}", summary="JPEG thumbnail of an indexed image (cached)",
             response_class=Response)
    async def thumbnail(image_id: str, size: int = Query(256, description="long side in pixels")):
        low, high = THUMBNAIL_SIZES
        if not low <= size <= high:
            raise ApiError(400, f"size must be from {low} to {high} pixels, got {size}")
        path = await service.run(indexed_file, service.holder.current, image_id)
        if path is None:
            raise ApiError(404, f"no image {image_id!r} in the index")
        from simret.data.images import ImageReadError

        try:
            data = await service.run(service.thumbnails.get, path, size)
        except (ImageReadError, OSError) as err:
            raise ApiError(404, f"image {image_id!r} cannot be read now ({err})") from None
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})

    @app.get("/attention", summary="SimPool attention overlay (PNG) of an indexed image", response_class=Response)
    async def attention_id(id: str = Query(..., description="an id of the index")):  # noqa: A002
        path = await service.run(indexed_file, service.holder.current, id)
        if path is None:
            raise ApiError(404, f"no image {id!r} in the index")
        return Response(await service.attention_png(path), media_type="image/png")

    @app.post("/attention", summary="SimPool attention overlay (PNG) of an uploaded image", response_class=Response)
    async def attention_upload(image: UploadFile = File(..., description="the image")):
        path = await service.save_upload(image)
        try:
            return Response(await service.attention_png(path), media_type="image/png")
        finally:
            path.unlink(missing_ok=True)

    _add_classify_route(app, service)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", summary="The search page", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_classify_route(app: FastAPI, service: SearchService) -> None:
    """``POST /classify`` with a support set; without one, ``/classify`` answers 404 saying how to enable it."""
    if service.support is None:
        @app.api_route("/classify", methods=["GET", "POST"], include_in_schema=False)
        async def classify_off():
            raise ApiError(404, OFF_MESSAGE)
        return

    support = service.support

    @app.post("/classify", summary="Label an uploaded image from the support set "
                                   "(as simret classify SUPPORT_DIR IMAGE --format jsonl)")
    async def classify_upload(image: UploadFile = File(..., description="the image to label"),
                              top: int = Query(DEFAULT_TOP, description="best classes listed")) -> Dict[str, Any]:
        if not 1 <= top <= service.max_k:
            raise ApiError(400, f"top must be from 1 to {service.max_k}, got {top}")
        path = await service.save_upload(image)
        try:
            features = await service.embed(path)
        finally:
            path.unlink(missing_ok=True)
        return await service.run(support.answer, features, image.filename or "upload", top)


# ---------------------------------------------------------------------------------------- errors


def _add_error_handlers(app) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404 and message == "Not Found":
            message = f"no such page: {request.url.path}"
        return JSONResponse({"error": message}, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        return JSONResponse({"error": _validation_message(err)}, status_code=400)

    @app.exception_handler(Exception)
    async def bug(request, err: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err, exc_info=err)
        return JSONResponse({"error": "internal error (logged by the server)"}, status_code=500)


def _validation_message(err) -> str:
    parts = []
    for problem in err.errors():
        where = [str(p) for p in problem.get("loc", ()) if p not in ("query", "body", "path")]
        name = ".".join(where) or "request"
        if problem.get("type") == "missing":
            parts.append(f"{name}: missing"
                         + (" (send the image as multipart field 'image')" if name == "image" else ""))
        else:
            parts.append(f"{name}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# ---------------------------------------------------------------------------------------- middleware


def _add_middleware(app, service: SearchService, *, token: Optional[str], cors: Optional[List[str]],
                    max_bytes: int) -> None:
    from starlette.routing import Match

    from simret.serve.middleware import AccessMiddleware, BodyLimitMiddleware, TokenMiddleware

    def route_of(scope, original) -> str:
        """The route template a request matched (a bounded set of metric labels), else "other"."""
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        for candidate in app.router.routes:
            match, _ = candidate.matches(original)
            if match == Match.FULL:
                return getattr(candidate, "path", "other")
        return "other"

    # add_middleware puts each one outside the previous: body limit (innermost), token, CORS, access log
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)
    if token:
        app.add_middleware(TokenMiddleware, token=token)
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessMiddleware, metrics=service.metrics, route_of=route_of)
