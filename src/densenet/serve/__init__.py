"""The HTTP prediction service and its web page (``densenet serve``).

``create_app(classifier, config)`` builds the FastAPI application; ``serve(...)`` runs it on
uvicorn. Needs the ``serve`` extra: ``pip install "densenet-toolkit[serve]"``.

A front end: imports ``densenet.tasks`` and the packages below it, never ``train`` or ``cli``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from densenet.errors import DenseNetError
from densenet.serve.app import create_app
from densenet.serve.batcher import Batcher, BatchResult, QueueFull
from densenet.serve.config import ServeConfig
from densenet.tasks.predict import Classifier
from densenet.weights.download import sha256_file
from densenet.weights.published import get_weights, list_weights

__all__ = [
    "BatchResult",
    "Batcher",
    "QueueFull",
    "ServeConfig",
    "create_app",
    "serve",
    "weights_metadata",
]

GRACEFUL_SHUTDOWN_S = 30  # on SIGTERM/SIGINT, the longest wait for requests in flight


def serve(
    classifier: Classifier,
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    weights: dict[str, Any] | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``classifier`` on ``host:port`` until SIGTERM or SIGINT, which stop new connections,
    finish the requests in flight (up to 30 s), then return. A service that cannot warm up stops
    at once and raises ``DenseNetError`` with the reason (never up and unready for good)."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    failures: list[str] = []

    def stop(reason: str) -> None:
        failures.append(reason)
        server.should_exit = True

    app = create_app(
        classifier, config, model_name=model_name, weights=weights, on_warm_up_failure=stop
    )
    # the service's own messages (ready, warm-up or inference failures) beside uvicorn's
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["densenet"] = {"handlers": ["default"], "level": log_level.upper()}
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            log_config=log_config,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    server.run()
    if failures:
        raise DenseNetError(f"the service could not warm up ({failures[0]}); it stopped")


def weights_metadata(classifier: Classifier, weights: Any) -> dict[str, Any] | None:
    """What ``GET /v1/models`` says about the weights: a local file's name and SHA-256, a
    published entry's metadata, or None for random weights."""
    if isinstance(weights, (str, os.PathLike)) and Path(weights).is_file():
        return {"file": Path(weights).name, "sha256": sha256_file(weights)}
    card = classifier.card
    if card.arch is not None and card.weights in list_weights(card.arch):
        return get_weights(card.arch, card.weights).meta()
    return None
