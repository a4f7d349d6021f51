"""Qwen-Image: text to image and image editing (MMDiT with a Qwen2.5-VL text encoder)."""
