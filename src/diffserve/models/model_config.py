"""The base of every model's typed config: a frozen dataclass read from a diffusers config.json.

Unknown keys are an error that names them (a key we do not know is an architecture feature we do not
implement); keys starting with "_" are metadata. JSON lists become tuples so configs stay hashable.
No torch here: training scripts and tests read configs without building anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

T = TypeVar("T", bound="ModelConfig")

CONFIG_NAME = "config.json"


class ModelConfig:
    # Written as "_class_name" by to_dict(); diffusers writes the model class there.
    _class_name: str = ""

    @classmethod
    def from_dict(cls: type[T], config: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has unsupported key(s) {unknown}; supported: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def from_pretrained(cls: type[T], folder: str) -> T:
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": self._class_name, **values}

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
