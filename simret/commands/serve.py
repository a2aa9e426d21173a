"""``simret serve``: a search service and a web page over an index directory (FastAPI + uvicorn)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click

from simret.commands.options import model_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command(short_help="Serve an index: search API, thumbnails, attention maps and a web page.")
@click.argument("index_dir", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than loopback without --token prints a warning).")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--token", envvar="SIMRET_SERVE_TOKEN", default=None, metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' on every route but /health (also from "
                   "$SIMRET_SERVE_TOKEN, which keeps it off the process list). A browser opens /?token=TOKEN once.")
@click.option("--cors", "cors", multiple=True, metavar="ORIGIN",
              help="Let pages of ORIGIN (e.g. https://example.org) call the API from a browser; repeatable. "
                   "Default: no CORS.")
@click.option("-j", "--workers", type=click.IntRange(1, 256), default=None, metavar="N",
              help="Threads for file, thumbnail and index work (default: min(8, CPUs + 4)). The model always "
                   "runs once, on its own thread.")
@click.option("-b", "--batch-size", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Most query images described in one forward pass (1: no micro-batching).")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 1000), default=5.0, show_default=True,
              help="How long the model waits for more queries once one has arrived.")
@click.option("--max-upload-mb", type=click.FloatRange(0, 4096, min_open=True), default=20.0, show_default=True,
              help="Largest upload; larger ones are refused with 413.")
@click.option("--reload-interval", type=click.FloatRange(0, 3600), default=2.0, show_default=True,
              help="Seconds between checks for a new generation of DIR (simret index --append); 0: only on SIGHUP.")
@click.option("--rerank", type=click.IntRange(0, 1000), default=None, metavar="R",
              help="ivfpq indexes: re-score the top k·R candidates with the exact stored descriptors (0: off; "
                   "default: the depth the build measured to reach recall@10 >= 0.95, shown by simret info; 16 "
                   "for indexes built before).")
@click.option("--support", type=click.Path(path_type=Path), default=None, metavar="SUPPORT_DIR",
              help="Add POST /classify: label uploads from the examples in SUPPORT_DIR/<class>/<images>, as "
                   "simret classify does (support features extracted at start with the index's encoder, cached).")
@click.option("--support-method", default=None, metavar="NAME",
              help="How /classify scores: protonet (default), cosine, simpleshot or logreg (as simret classify "
                   "--method).")
@click.option("--base-mean", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="simpleshot/logreg with --support: the base mean to subtract (CL2N), a .npy vector or a "
                   "features-<split>.h5 bank (as simret classify --base-mean).")
@model_options
@click.pass_context
def serve(ctx: click.Context, index_dir: str, host: str, port: int, token: Optional[str], cors: Tuple[str, ...],
          workers: Optional[int], batch_size: int, batch_wait_ms: float, max_upload_mb: float,
          reload_interval: float, rerank: Optional[int], support: Optional[Path], support_method: Optional[str],
          base_mean: Optional[Path], model_spec: Dict[str, Any]) -> None:
    """Serve the index DIR over HTTP until Ctrl-C (or SIGTERM): a JSON search API and a search page.

    \b
    The encoder named by DIR/meta.json is loaded once (model options override it, and a model whose
    fingerprint differs from the index's is refused), and so is the index. Concurrent queries share
    forward passes (micro-batching). A new generation of DIR (simret index --append) is picked up
    within --reload-interval seconds, or at once on SIGHUP, without failing queries in flight.

    \b
    Routes: GET / (the page), GET /health, POST /search (multipart field 'image'; k, bbox, qe, alpha),
    GET /search?id=ID&k=K, GET /images/ID, GET /thumbnails/ID?size=256, GET /attention?id=ID,
    POST /attention, GET /metrics (Prometheus), GET /docs (API page); with --support, POST /classify
    (multipart field 'image'; top): {"image", "class", "score", "top", "method"}, as
    simret classify SUPPORT_DIR IMAGE --format jsonl.

    \b
    Examples:
      simret serve idx/                      # then open http://127.0.0.1:8080/
      curl -F image=@query.jpg 'http://127.0.0.1:8080/search?k=5'
      SIMRET_SERVE_TOKEN=s3cret simret serve idx/ --host 0.0.0.0 --port 8000
      simret -v serve idx/ --batch-size 32   # -v: one log line per request
      simret serve idx/ --support pets/ --support-method logreg
      curl -F image=@photo.jpg 'http://127.0.0.1:8080/classify?top=3'
    """
    import socket

    from simret.utils.logs import get_logger

    log = get_logger("simret.serve")
    _check_support_options(support, support_method, base_mean)
    if host not in LOOPBACK and not token:
        click.echo(f"Warning: listening on {host} without --token: anyone who can reach this machine can search "
                   f"the index and read its images. Pass --token (or $SIMRET_SERVE_TOKEN).", err=True)
    app = _build_app(ctx, index_dir, model_spec, token=token, cors=list(cors), threads=workers, batch_size=batch_size,
                     batch_wait_ms=batch_wait_ms, max_upload_mb=max_upload_mb, reload_interval=reload_interval,
                     rerank=rerank, support=support, support_method=support_method, base_mean=base_mean)
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    reuse_port=False)
    except OSError as err:
        raise click.ClickException(f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port "
                                   f"or --host") from None
    bound = sock.getsockname()[1]
    loaded = app.state.service.holder.current
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s (%d images, generation %s) on http://%s:%d/ (API page: /docs); Ctrl-C stops",
             index_dir, loaded.count, loaded.generation, shown, bound)
    if support is not None:
        log.info("POST /classify labels uploads from %s", app.state.service.support.classifier.describe())
    _run(app, sock, verbose=getattr(ctx.obj, "verbosity", 0) > 0 if ctx.obj else False)


def _check_support_options(support: Optional[Path], method: Optional[str], base_mean: Optional[Path]) -> None:
    """--support-method and --base-mean need --support; a bad support folder or method fails before any model is
    built (as in simret classify)."""
    if support is None:
        if method is not None or base_mean is not None:
            name = "--support-method" if method is not None else "--base-mean"
            raise click.UsageError(f"{name} applies to /classify: add --support SUPPORT_DIR")
        return
    import numpy as np

    from simret.classify.support import DEFAULT_METHOD, build_method, load_support

    load_support(support)
    build_method(method or DEFAULT_METHOD, None if base_mean is None else np.zeros(1, dtype=np.float32), quiet=True)
    if base_mean is not None and not base_mean.is_file():
        raise FileNotFoundError(f"no such base-mean file: {base_mean} (a .npy vector or a features-<split>.h5 bank)")


def _build_app(ctx: click.Context, index_dir: str, model_spec: Dict[str, Any], **options: Any):
    from simret.commands.index import _spec_from_meta
    from simret.commands.options import build_inference_encoder
    from simret.retrieval.indexdir import IndexDir
    from simret.serve import create_app

    index = IndexDir(index_dir)
    spec = _spec_from_meta(ctx, model_spec, index.meta)
    encoder, device = build_inference_encoder(spec, ctx, compile="off")  # a server's first queries must not wait
    index.check_queries(encoder.fingerprint, what=f"query descriptors of this model ({spec.get('arch')})")
    return create_app(index_dir, encoder=encoder, device=device, **options)


def _run(app, sock, *, verbose: bool) -> None:
    """uvicorn on the bound socket until SIGINT/SIGTERM (graceful: requests in flight finish, exit status 0);
    SIGHUP reloads the index at once."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            wanted = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
            previous = {sig: signal.signal(sig, self.on_signal) for sig in wanted}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def on_signal(self, sig, frame) -> None:
            if sig == getattr(signal, "SIGHUP", None):
                app.state.service.poller.wake()
            elif self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
            else:
                self.should_exit = True

    config = uvicorn.Config(app, log_config=None, log_level="info" if verbose else "warning", access_log=False,
                            timeout_graceful_shutdown=10, server_header=False)
    with sock:
        Server(config).run(sockets=[sock])
    from simret.utils.logs import get_logger

    get_logger("simret.serve").info("stopped")
