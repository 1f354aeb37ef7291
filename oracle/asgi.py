"""The whole service as an ASGI app, for ASGI servers on trio::

    hypercorn --worker-class trio --bind 127.0.0.1:8080 oracle.asgi:app

Settings come from ``FIATPRINT_CONFIG`` (a TOML file) and ``FIATPRINT_*``
environment variables, as for ``fiatprint serve`` without flags. The actors
(intake, decoder, window, node sync, history) start when the server starts
serving (ASGI lifespan startup, in the app's own nursery) and stop when it
stops. The server's own options decide where it listens: the ``host`` and
``port`` settings are not used here. Use one worker: each worker process
would run its own pipeline with its own ZMQ subscription and window.

Importing this module builds ``app``: it reads the settings and opens the
history file. A bad setting raises :class:`oracle.config.ConfigError` at
import, which the server reports as a failure to load the app. Library code
should call :func:`create_asgi_app` (or use :mod:`oracle.service`) instead of
importing this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import trio
from quart_trio import QuartTrio

from .config import load_settings
from .history import History
from .logging import setup_logging
from .service import Service

__all__ = ["app", "create_asgi_app"]


def create_asgi_app(environ: Mapping[str, str] = os.environ) -> QuartTrio:
    """A QuartTrio app that runs the service's actors for as long as it serves.

    Raises:
      oracle.config.ConfigError: a bad setting.
      oracle.history.HistoryError: the history file cannot be opened.
    """
    settings = load_settings(None, environ)
    setup_logging(settings.log_level, settings.log_format)
    history = History(settings.history_path) if settings.history_path else None
    service = Service(settings, history=history)
    app = service.create_app()
    scope = trio.CancelScope()

    async def pipeline(task_status: trio.TaskStatus[Service]) -> None:
        with scope:
            await service.run_pipeline(task_status=task_status)

    @app.before_serving
    async def _start() -> None:
        await app.nursery.start(pipeline)

    @app.after_serving
    async def _stop() -> None:
        scope.cancel()
        if history is not None:
            history.close()

    app.config["FIATPRINT_SERVICE"] = service
    return app


#: The service's app, built from the environment when this module is imported.
app: QuartTrio = create_asgi_app()
