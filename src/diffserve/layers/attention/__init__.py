from diffserve.layers.attention.backends import backend_names, select_attention_backend
from diffserve.layers.attention.layer import Attention, set_attention_backend

__all__ = ["Attention", "backend_names", "select_attention_backend", "set_attention_backend"]
