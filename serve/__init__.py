"""The inference web UI."""
