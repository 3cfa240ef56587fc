"""ctd: cross-tokenizer distillation (transplant, align, distill, heal)."""

__version__ = "0.1.0"
