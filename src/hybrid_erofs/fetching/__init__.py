"""Background fetch of lazily mounted layers: prefetch profiles first, then every other span,
at a bounded rate, yielding to on-demand reads; the complete layer verified (docs/fetch.md)."""
