"""masqclip: open-vocabulary universal image segmentation built on MasQCLIP (ICCV 2023).

``masqclip_cli.load_model(source, device="cpu", precision="fp32")`` loads a registered model, one of our model files,
or an official checkpoint (see :mod:`masqclip_cli.modeling.factory`).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `masqclip --help` does not import torch.
    if name == "load_model":
        from masqclip_cli.modeling.factory import load_model

        return load_model
    raise AttributeError(f"module 'masqclip_cli' has no attribute '{name}'")
