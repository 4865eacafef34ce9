"""The simulator and the session-trace format it shares with the real engine."""
