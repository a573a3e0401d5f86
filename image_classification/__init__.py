"""Image classification with dynamic convolutions (PEDConv and peers)."""
