"""doit task generators for the c10 build graph: the only doit-aware code besides the CLI and API."""
