"""Trust: binding checks between index files and layers, verification against the layer, the
node's policy for indexes found in a registry, signatures (docs/security.md)."""
