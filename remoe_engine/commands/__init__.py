"""Subcommands of the `remoe` CLI, one module each (see remoe_engine/cli.py)."""
