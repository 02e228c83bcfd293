"""gzindex package."""
