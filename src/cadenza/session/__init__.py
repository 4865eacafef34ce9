"""Durable sessions: the conversation store that lets any cached KV be dropped and rebuilt."""
