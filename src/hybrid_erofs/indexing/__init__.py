"""Indexing: one layer in one pass (layer.py), every layer of an image in worker processes
(image.py), the image's index.json (imageindex.py), and publishing it next to the image
(publish.py)."""
