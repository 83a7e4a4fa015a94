"""The command-line apps (thin Hydra entry points), their config checks and run-folder plumbing."""
