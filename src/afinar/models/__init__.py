"""Models: resolve a name/path to weights, load them, attach and save adapters."""
