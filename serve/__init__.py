"""Ray Serve application for a finished hybrid: OpenAI-compatible endpoints, autoscaling, evaluation.

Import the submodules directly (`serve.app`, `serve.engine`, `serve.eval`); this file stays empty so
that `import serve` pulls in neither Ray nor torch.
"""
