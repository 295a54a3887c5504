"""moec's FX passes: one pass per file; the order they run in is `moec.pipeline.PIPELINE`."""
