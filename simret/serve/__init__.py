"""``simret serve``: a search service and a web page over an index directory.

``create_app(index_dir, ...)`` returns the ASGI application (FastAPI), to run with any ASGI server, mount in
another application, or test with its test client::

    import uvicorn
    from simret.serve import create_app

    uvicorn.run(create_app("idx/"), host="127.0.0.1", port=8080)
"""
from simret.serve.app import create_app

__all__ = ["create_app"]
