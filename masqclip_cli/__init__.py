"""masqclip: open-vocabulary universal image segmentation built on MasQCLIP (ICCV 2023)."""

__version__ = "0.1.0"
