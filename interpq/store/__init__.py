"""Where bytes live: the artifact store (URIs, one atomic writer) and activation datasets.

``artifacts`` names every artifact and writes it atomically; ``datasets`` reads and writes
activation shards and manifests. Knows file formats and paths; knows nothing of jobs, the
broker or the database.
"""
