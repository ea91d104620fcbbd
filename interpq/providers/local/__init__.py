"""The local OpenAI-compatible provider (``interpq serve``): real MiniLM embeddings and a tiny
random-weight GPT-2 for chat, with optional injected faults and sliding-window rate limits.

A server process, used by the demo, the tests and the benchmarks; the workers talk to it over
HTTP like to any provider and never import it.
"""
