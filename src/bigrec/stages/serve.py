"""``bigrec serve``: an HTTP recommendation service for a finished run folder (FastAPI + uvicorn).

The run folder is loaded once (:class:`bigrec.app.recommender.Recommender`) and served by
:func:`bigrec.app.service.create_app`: the page at ``/``, ``POST /recommend``, ``GET /items`` and
``GET /health`` (OpenAPI docs at ``/docs``). Concurrent requests are batched into one generation
call. The service binds loopback unless ``--host`` says otherwise; it has no authentication.
"""

import logging
from dataclasses import dataclass

from bigrec.app.service import Limits, create_app
from bigrec.config import option

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
LIMITS = Limits()  # the defaults


@dataclass
class Config:
    run: str = option(help="finished run folder (holds run.yaml; written by bigrec demo)")
    host: str = option("127.0.0.1", "address to bind; loopback by default (the service has no authentication)")
    port: int = option(8000, "TCP port", minimum=0)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda if available)")
    max_batch: int = option(LIMITS.max_batch, "most requests in one generation call", minimum=1)
    batch_window_ms: float = option(LIMITS.batch_window_ms, "how long the first waiting request waits for others to join its batch", minimum=0)
    max_queue: int = option(LIMITS.max_queue, "requests waiting beyond this are refused with 503", minimum=1)
    max_history: int = option(LIMITS.max_history, "most items in a request's history (the prompt uses the latest of them)", minimum=1)
    max_k: int = option(LIMITS.max_k, "largest k a request may ask for", minimum=1)
    max_title_length: int = option(LIMITS.max_title_length, "longest title (characters) in a history or a search", minimum=1)
    max_body_bytes: int = option(LIMITS.max_body_bytes, "largest request body; a larger one is refused with 413 before it is "
                                        "read (the longest valid history is far smaller)", minimum=1)
    threads: int = option(0, "torch CPU threads; 0 = torch's default")
    log_level: str = option("info", "uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])

    def limits(self) -> Limits:
        """The service's limits from these options."""
        return Limits(self.max_batch, self.batch_window_ms, self.max_queue, self.max_history, self.max_k,
                      self.max_title_length, self.max_body_bytes)


def run(config: Config) -> int:
    import torch
    import uvicorn

    from bigrec.app.recommender import Recommender

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if config.host not in LOOPBACK:
        log.warning("binding %s: the service is reachable from other machines and has no authentication",
                    config.host)
    rec = Recommender.from_run(config.run, device=config.device)
    app = create_app(rec, config.limits())
    log.info("serving %s on http://%s:%d (docs at /docs)", rec.run_dir, config.host, config.port)
    uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level)).run()
    return 0
