"""Fast math with no framework objects: each kernel beside its plain-PyTorch reference (import submodules directly)."""
