"""The diffusers adapter: any diffusers pipeline served by diffserve's engine (see pipeline_adapter.py).

Nothing is imported here: the registry names the adapter by import path, and `features` (what it
gives and refuses) is read at engine start without torch.
"""
