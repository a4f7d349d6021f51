"""`diffserve generate --image a.png [--image b.png] PROMPT` with an editing model (tiny
Qwen-Image-Edit-Plus): the images reach the model in order, and bad images are one-line errors."""

import numpy as np
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.entrypoints.cli import main
from diffserve.testing.conformance import sample_image as picture


def test_generate_with_two_images_equals_offline(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen-image-edit-plus")
    first, second = picture(64, 48, 0), picture(48, 64, 1)
    first.save(tmp_path / "a.png")
    second.save(tmp_path / "b.png")
    out = tmp_path / "edited.png"
    assert main(["generate", "--model", path, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.png"),
                 "make the sky purple", "-o", str(out), "--steps", "2", "--height", "96", "--width", "128",
                 "--seed", "1", "--dtype", "float32", "--device", "cpu", "--disable-progress-bar"]) == 0
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        offline = omni.generate({"prompt": "make the sky purple", "image": [first, second]},
                                OmniDiffusionSamplingParams(num_inference_steps=2, height=96, width=128, seed=1))
    written = np.asarray(Image.open(out))
    assert written.shape == (96, 128, 3)
    np.testing.assert_array_equal(written, np.asarray(offline[0].images[0]))


def test_bad_images_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("qwen-image-edit-plus")
    picture(64, 48, 0).save(tmp_path / "a.png")
    Image.new("I;16", (64, 48)).save(tmp_path / "deep.png")
    base = ["generate", "--model", path, "x", "--steps", "1", "--device", "cpu"]
    assert main([*base, *["--image", str(tmp_path / "a.png")] * 4]) == 2
    err = capsys.readouterr().err
    assert "takes at most 3 input image(s) per prompt, got 4" in err and "Traceback" not in err
    assert main([*base, "--image", str(tmp_path / "deep.png")]) == 2
    assert "mode 'I;16' (more than 8 bits per channel) is not supported" in capsys.readouterr().err
    assert main(["generate", "--model", path, "x", "--steps", "1", "--device", "cpu"]) == 2
    assert "needs an input image with every prompt" in capsys.readouterr().err
