"""Building blocks that know nothing of models: attention and its patterns, embeddings, MLPs, norms."""
