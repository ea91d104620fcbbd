"""What extraction jobs are made of, apart from the runner (``runners/extract.py``): the
content-addressed shard cache (``shards``), shards from local models (``local``) and from
providers' embeddings (``api``). Knows the store, the database rows and the providers; the
forward-pass math is ``interpq.core.extraction``.
"""
