"""cxredit: disease-aware editing of chest X-rays with StyleGAN2."""

__version__ = "0.1.0"
