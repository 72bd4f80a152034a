"""Model building blocks shared by every model family: attention contract, norms, rotary
embeddings, linear layers with weight loaders, MLPs and mixture-of-experts.

This package imports only torch: models build on it, the engine implements its backends.
"""
