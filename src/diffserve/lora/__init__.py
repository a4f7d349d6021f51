"""LoRA adapters: several resident in one engine, chosen per request (`lora={"name": scale}`).

`Omni(model, lora_modules={"name": "adapter.safetensors"})` loads them at engine start
(diffserve.lora.manager); the layers apply them unmerged (diffserve.layers.lora); the files may be
in the diffusers/PEFT or the kohya (FLUX.1) layout (diffserve.lora.formats).
"""

from diffserve.lora.formats import AdapterWeights, LoRAFormatError, read_adapter
from diffserve.lora.manager import LoRAManager

__all__ = ["AdapterWeights", "LoRAFormatError", "LoRAManager", "read_adapter"]
