"""The pipeline's stages, one module each, every one with `run(spec, ctx) -> its output` (a jobs.outputs
dataclass); jobs.run.PIPELINE is the table of them, in order."""
