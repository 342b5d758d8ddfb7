"""swtool: find, catalog, ablate and export the super weights of LLM checkpoints on a CPU."""

__version__ = "0.1.0"
