"""Data for the tri-modal workload: sources, tokenizers, the token stream."""
