"""The composition root: the Gradio UI (`ui`) and the OpenAI-compatible API (`serving.api`) on one
port, served by uvicorn. Neither knows of the other; only this module puts them together.

    app = build_server_app(create_app(engine), engine)     # a FastAPI app: the API, then the UI at "/"
    Server(app, port=7860).start()                         # in a thread (tests, notebooks)
    serve(create_app(engine), engine, host, port)          # in the calling thread (app.py)
"""

from __future__ import annotations

import threading
import time

import gradio as gr

from .serving.api import create_api_app
from .ui import CSS, launch_options


def build_server_app(demo: gr.Blocks, engine, api_settings=None):
    """The FastAPI app that serves everything on one port: the OpenAI-compatible API, /health and
    /metrics (api.py), and the UI mounted at "/" with the options `launch` gives it."""
    app = create_api_app(engine, api_settings)
    demo.queue(default_concurrency_limit=1)
    options = launch_options("127.0.0.1", None, False, engine)
    demo.max_threads = options["max_threads"]  # what launch() sets: the worker threads of its events
    demo._queue.max_thread_count = options["max_threads"]
    return gr.mount_gradio_app(app, demo, path="/", css=CSS, footer_links=options["footer_links"],
                               show_error=options["show_error"])


class Server:
    """uvicorn serving build_server_app's app in a thread (tests, notebooks): `.url`, `.close()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 7860):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = f"http://{host}:{port}/"

    def start(self, timeout: float = 60.0) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The server did not start on {self.url}.")
            time.sleep(0.05)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(demo: gr.Blocks, engine, host: str = "127.0.0.1", port: int = 7860, api_settings=None) -> None:
    """Serve the UI and the API on host:port until interrupted (app.py): the same uvicorn server
    as `Server`, in the calling thread."""
    Server(build_server_app(demo, engine, api_settings), host, port).server.run()
