"""The reference workload: a tri-modal (text, image-text, audio-text) masked diffusion model, built on sdebatch's
public API only (Bethune et al. 2026, arXiv 2602.21472)."""
