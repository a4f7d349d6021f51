"""benchmarks/bench_e2e.py end to end on diffserve.testing's tiny checkpoints (fp32, CPU, 2 steps):
one video row and the audio row, so the output-kind handling (frames, audio) and the JSON it writes
are exercised; the image rows share the same code path as the video one."""

import json
import math

import pytest

from tests.conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_e2e")


def _run(bench, tmp_path, model: str) -> dict:
    out = tmp_path / f"{model}.json"
    args = ["--model", model, "--tiny", "--device", "cpu", "--repeats", "1", "--warmup-steps", "1",
            "--json-out", str(out)]
    assert bench.main(args) == 0
    return json.loads(out.read_text())


# (row, output kind, output shape, the least PSNR in dB of output and latents). Measured on CPU:
# wan2.1-1.3b 139.0 dB (video) / 136.6 dB (latents); stable-audio identical outputs (inf dB: its SDE
# noise and every op match bit for bit).
CASES = [
    ("wan2.1-1.3b", "video", [1, 5, 3, 32, 32], 100.0),
    ("stable-audio", "audio", [1, 2, 60], 100.0),
]


@pytest.mark.parametrize("model,kind,shape,min_psnr", CASES, ids=[c[0] for c in CASES])
def test_tiny_row_matches_diffusers(bench, tmp_path, model, kind, shape, min_psnr):
    result = _run(bench, tmp_path, model)
    assert result["output_kind"] == kind and result["output_shape"] == shape
    assert result["request_shape"] == bench.MODELS[model].tiny_shape
    assert result["outputs_finite"]
    for field in ("output", "latents"):
        psnr = result[field]["psnr_db"]  # inf when the two sides agree exactly
        assert not math.isnan(psnr) and psnr > min_psnr, (field, psnr)
    # The stage split of both sides is there (a T2V call has no VAE encode).
    for side in ("diffusers", "diffserve"):
        assert {"encode_s", "denoise_s", "decode_s"} <= set(result[side]["stages_s"])
    assert "text_encoder_s" in result["diffusers"]["stages_s"] and "vae_encode_s" not in result["diffusers"]["stages_s"]
    stats = result["diffusers_output_stats"]
    assert ("peak_abs" in stats) == (kind == "audio") and stats["std"] > 0
