"""The pipeline's stages, one module each, every one with `run(spec, ctx) -> info` (see jobs.run)."""
