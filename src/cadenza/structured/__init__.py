"""Structured output: grammars that constrain sampling (JSON schema, JSON object, Lark, regex).

``spec`` describes a request's constraint as plain data (it travels inside ``SamplingParams``
and is checked at the API edge); ``matchers`` keeps one llguidance matcher per running request
next to the sampler and turns them into a token bitmask each step. Both are torch-free.
"""
