"""gradot: privacy-preserving offsite-tuning with training-free gradient-preserving emulators."""

__version__ = "0.1.0"
