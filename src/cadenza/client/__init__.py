"""HTTP clients of a running Cadenza (or any OpenAI-compatible) server."""
