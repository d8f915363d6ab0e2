"""Class-agnostic Mask2Former-style mask proposal networks (plain PyTorch, no compiled ops)."""
