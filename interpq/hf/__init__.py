"""Hugging Face models on a device: the packaged MiniLM, tiny random-weight GPT-2s, any id.

Knows how to load a model and its tokenizer (``loading.load``) and which names load offline;
knows nothing of hooks (``core.layout``), jobs, queues or the database.
"""
