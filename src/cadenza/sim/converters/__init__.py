"""Converters from public workloads (ShareGPT, Mooncake, Azure, synthetic agents) to session traces.

Each module turns one source into a list of :class:`cadenza.sim.trace.TraceTurn`; the modelling
choices (what the source lacks and how it is filled in) are written at the top of each module.
"""
