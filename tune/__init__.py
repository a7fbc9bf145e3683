"""Ray Tune search over MLA layers and ranks under a KV-cache and memory budget: `zebra tune SPEC`
(tune.search). Nothing is imported here, so `import tune.space` stays free of Ray."""
