"""The `bigrec` stage commands: each module has a `Config` dataclass and `run(config)`, and only orchestrates."""
