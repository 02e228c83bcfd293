"""The mount lifecycle: a daemon per mount (lifecycle.py) serving a layer (layer.py) or a whole
image stacked with overlayfs (image.py), the index found in the registry (discovery.py), state
records (state.py), kernel calls (kernel.py, nbdlink.py) and `--reattach` (reattach.py)."""
