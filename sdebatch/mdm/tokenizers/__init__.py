"""Discrete tokenizers trained locally (image codes, audio codes, text ids) for the tri-modal MDM."""
