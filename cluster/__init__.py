"""Ray plumbing shared by jobs, tune and serve. Submodules are imported explicitly; nothing heavy here."""
