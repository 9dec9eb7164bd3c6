"""fastfair: kernel-accelerated discovery and mitigation of social bias in text-to-image diffusion."""
__version__ = "0.1.0"
