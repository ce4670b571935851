"""helpers: everything reusable behind the recognition (Tiny ImageNet) and retrieval (Cars-196) notebooks."""

__version__ = "0.1.0"
