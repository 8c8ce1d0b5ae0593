"""The video world: short clips of a handwritten digit moving across a small frame, for the Wan adapter."""
