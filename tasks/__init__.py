"""Python tasks: data built from real code and scores earned by running it in a sandbox."""
