"""`diffserve generate --lora-modules NAME=PATH --lora NAME=SCALE`: the image an offline engine gives,
and one-line errors for malformed pairs and unknown adapters."""

import numpy as np
import pytest
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.entrypoints.cli import main

ARGS = ["--height", "32", "--width", "48", "--steps", "2", "--seed", "3", "--max-sequence-length", "8",
        "--disable-progress-bar", "--dtype", "float32", "--device", "cpu"]


def test_generate_with_an_adapter_equals_offline(tiny_flux, flux_adapters, tmp_path):
    out = tmp_path / "fox.png"
    assert main(["generate", "a red fox", "--model", tiny_flux, "-o", str(out), *ARGS,
                 "--lora-modules", f"style={flux_adapters['style']}", f"detail={flux_adapters['detail']}",
                 "--lora", "style=0.5", "detail=1"]) == 0
    modules = {name: flux_adapters[name] for name in ("style", "detail")}
    with Omni(tiny_flux, dtype="float32", device="cpu", lora_modules=modules) as omni:
        expected = omni.generate("a red fox", OmniDiffusionSamplingParams(
            height=32, width=48, num_inference_steps=2, seed=3, max_sequence_length=8,
            lora={"style": 0.5, "detail": 1.0}))[0].images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))


@pytest.mark.parametrize("flags, message", [
    (["--lora-modules", "style"], "expected NAME=VALUE, got 'style'"),
    (["--lora", "style=strong"], "'style=strong': 'strong' is not a float"),
])
def test_malformed_pairs_are_usage_errors(tiny_flux, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", tiny_flux, *ARGS, *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_adapter_is_one_line_and_exit_2(tiny_flux, flux_adapters, capsys):
    code = main(["generate", "x", "--model", tiny_flux, *ARGS, "--lora-modules", f"style={flux_adapters['style']}",
                 "--lora", "sytle=1"])
    err = capsys.readouterr().err
    assert code == 2 and "error: unknown LoRA adapter(s) 'sytle'; the loaded adapters are: style" in err
    assert "Traceback" not in err
