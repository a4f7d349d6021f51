"""Qwen2-VL's processor (chat template, image tokens and the vision tower's pixel patches) without
its video processor.

transformers builds a processor's sub-processors from its `__init__` signature, and
`Qwen2VLProcessor` lists a video processor, which needs torchvision. The editing pipelines use
images only, so they load the released `processor/` folder through a subclass that leaves the video
processor out: it then loads with or without torchvision (a saved video processor config is ignored).
"""

from __future__ import annotations

import functools


@functools.cache
def qwen2vl_image_text_processor_class():
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor for images and text only (no video processor, so no torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return Qwen2VLImageTextProcessor


def load_qwen2vl_processor(folder: str):
    """Load a Qwen2-VL `processor/` folder (a released checkpoint's or a tiny one) without its video
    processor."""
    return qwen2vl_image_text_processor_class().from_pretrained(folder)
