"""``make bench``: speed of the pretext training step, the data pipeline and FAISS retrieval, each
measured next to its reference in one process and reported as ratios (results/bench.json, .md)."""
