"""The /metrics endpoint of a daemon: prometheus_client's HTTP server on one address."""

from __future__ import annotations

import logging

from ..errors import HybridErofsError
from .daemon import DaemonMetrics

log = logging.getLogger(__name__)


class MetricsError(HybridErofsError, OSError):
    """The metrics endpoint could not be started (address in use, not ours)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "metrics error"


class MetricsServer:
    """Serves `metrics` as Prometheus text at http://HOST:PORT/metrics from a daemon thread
    until `close()`. `port` 0 picks a free port (see `.port`). Raises MetricsError."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr=host,
                                                           registry=metrics.registry)
        except OSError as exc:
            raise MetricsError(f"--metrics-address {_format(host, port)}: cannot listen: "
                               f"{exc.strerror or exc}") from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        log.info("metrics at http://%s/metrics", _format(host, self.port))

    @property
    def address(self) -> str:
        """HOST:PORT as bound ([HOST]:PORT for IPv6)."""
        return _format(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["MetricsError", "MetricsServer"]
