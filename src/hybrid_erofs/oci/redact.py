"""Keep credentials out of logs: httpx logs every URL and httpcore the response headers (a
`Location` with a presigned query string), and presigned query strings are credentials."""

from __future__ import annotations

import logging
import re

# Everything after "?" in an absolute URL, and signature-like parameters of relative ones.
_URL_QUERY = re.compile(r"(https?://[^\s?'\"<>]+)\?[^\s'\"<>]*")
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:x-amz-[a-z-]+|x-goog-[a-z-]+|signature|sig|se|sp|sv|token|access_token|"
    r"key-pair-id|policy|expires)=)[^&\s'\"<>]*"
)
THIRD_PARTY_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2",
                       "httpcore.proxy", "httpcore.socks")


def redact(text: str) -> str:
    """Drop query strings from absolute URLs and secret-looking parameters from the rest."""
    return _SECRET_PARAM.sub(r"\1<redacted>", _URL_QUERY.sub(r"\1?<redacted>", text))


class RedactFilter(logging.Filter):
    """A logging filter that rewrites a record's message with `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactFilter()


def install_log_redaction() -> None:
    """Attach the filter to httpx's and httpcore's loggers (idempotent). Filters run on the
    logger that creates a record, so each of httpcore's child loggers gets it."""
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
