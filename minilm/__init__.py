"""minilm: a from-scratch MiniLM/BERT cross-encoder reranker in plain PyTorch.

    from minilm import CrossEncoder
    model = CrossEncoder.from_pretrained("cross-encoder/ms-marco-MiniLM-L6-v2")
    scores = model.predict([("query", "passage"), ...])
"""

__version__ = "0.1.0"
__all__ = ["CrossEncoder", "CrossEncoderModel", "Config"]


def __getattr__(name):
    # Lazy: `import minilm` must not pay for torch until a model is actually used (infer.py's cold start).
    if name == "CrossEncoder":
        from .crossencoder import CrossEncoder

        return CrossEncoder
    if name in ("CrossEncoderModel", "Config"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'minilm' has no attribute {name!r}")
