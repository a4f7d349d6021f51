"""The CLI with pipelines served through the diffusers adapter: `--backend`, `diffserve models`, and
`generate` writing each modality's file."""

from PIL import Image

from diffserve.entrypoints.cli import main


def test_models_lists_native_pipelines_and_the_adapter(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "  FluxPipeline" in out and "through the diffusers adapter" in out
    assert "cache_backend='cache_dit'" in out and "tea_cache" in out


def test_generate_an_image_with_a_pipeline_diffserve_does_not_port(tiny_checkpoint, tmp_path):
    out = tmp_path / "lighthouse.png"
    assert main(["generate", "--model", tiny_checkpoint("pixart-sigma"), "a lighthouse", "-o", str(out),
                 "--height", "32", "--width", "48", "--steps", "2", "--seed", "3", "--disable-progress-bar",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    assert Image.open(out).size == (48, 32)


def test_generate_audio_through_the_adapter(tiny_checkpoint, tmp_path):
    from diffserve.audio_io import decode_audio

    out = tmp_path / "rain.wav"
    assert main(["generate", "--model", tiny_checkpoint("audioldm2"), "rain", "-o", str(out), "--steps", "2",
                 "--audio-end-in-s", "0.64", "--disable-progress-bar", "--dtype", "float32", "--device", "cpu"]) == 0
    audio, rate = decode_audio(str(out))
    assert rate == 100 and audio.shape == (1, 64)


def test_backend_flag_errors_are_one_line(tiny_checkpoint, tiny_flux, capsys):
    assert main(["generate", "--model", tiny_checkpoint("pixart-sigma"), "x", "--backend", "native"]) == 2
    err = capsys.readouterr().err
    assert "error: pipeline class 'PixArtSigmaPipeline'" in err and "has no native diffserve pipeline" in err
    assert main(["generate", "--model", tiny_flux, "x", "--backend", "diffusers", "--tensor-parallel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: tensor_parallel_size=2: not available for FluxPipeline through the diffusers adapter" in err
    assert "Traceback" not in err
