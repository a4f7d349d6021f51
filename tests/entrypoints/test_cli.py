import subprocess
import sys

from PIL import Image

from diffserve.entrypoints.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffserve.entrypoints.cli", *args], capture_output=True, text=True)


def test_generate_writes_png_of_requested_size(tiny_flux, tmp_path):
    out = tmp_path / "fox.png"
    result = run_cli("generate", "--model", tiny_flux, "a red fox", "-o", str(out),
                     "--height", "32", "--width", "48", "--steps", "2", "--seed", "7", "--max-sequence-length", "8")
    assert result.returncode == 0, result.stderr
    assert "seed 7" in result.stdout
    assert Image.open(out).size == (48, 32)


def test_generate_several_outputs(tiny_flux, tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", tiny_flux, "x", "-o", str(out), "--height", "16", "--width", "16",
                 "--steps", "1", "--num-outputs", "2", "--max-sequence-length", "8", "--disable-progress-bar"]) == 0
    assert out.exists() and (tmp_path / "img_1.png").exists()


def test_bad_input_is_one_line_and_exit_2(tiny_flux, capsys):
    code = main(["generate", "--model", tiny_flux, "x", "--height", "30", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "error: height=30 is not supported" in err and "Traceback" not in err


def test_a_parameter_the_model_does_not_use_is_one_line_and_exit_2(capsys):
    # The built-in demo model draws images: it takes no frame count.
    code = main(["generate", "x", "--num-frames", "5", "--disable-progress-bar"])
    err = capsys.readouterr().err
    assert code == 2 and "error: num_frames=5 is not used by DiffservePixelDiTPipeline" in err
    assert "Traceback" not in err


def test_user_errors_are_one_line_without_a_traceback(tiny_checkpoint, tmp_path):
    cases = [
        (["generate", "x", "--device", "cuda"], "error: device 'cuda' was asked for but CUDA is not available"),
        (["generate", "x", "--model", str(tmp_path / "missing")], "does not exist (and it is not a Hugging Face hub id"),
        (["generate", "x", "-o", str(tmp_path / "x.gif"), "--steps", "1"],
         "cannot write image output to", ),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr[-2000:])


def test_a_video_can_be_written_as_mp4_gif_or_webp(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("wan2.1-t2v")
    for ext in ("mp4", "gif", "webp"):
        out = tmp_path / f"v.{ext}"
        assert main(["generate", "--model", path, "x", "-o", str(out), "--steps", "1",
                     "--disable-progress-bar"]) == 0
        frames = Image.open(out).n_frames if ext != "mp4" else None
        assert out.stat().st_size > 0 and frames in (None, 5)


def test_help_does_not_import_torch_and_shows_real_defaults_only():
    code = ("import sys\nfrom diffserve.entrypoints.cli import main\n"
            "for args in (['--help'], ['generate', '--help'], ['serve', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "TORCH False" in result.stdout, result.stdout[-500:] + result.stderr
    assert "(default: None)" not in result.stdout and "(default 4) (default" not in result.stdout
    assert "(default: 8000)" in result.stdout  # a real default is shown once


def test_tiny_checkpoints_run_small_by_default(tiny_checkpoint, tmp_path):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", tiny_checkpoint("wan2.1-t2v"), "x", "-o", str(out),
                 "--disable-progress-bar"]) == 0
    from diffserve.media import decode_video

    frames, _ = decode_video(str(out))
    assert frames.shape == (5, 32, 32, 3)  # make-tiny's defaults, not Wan's 81 frames at 832x480


def test_help_documents_commands_and_flags():
    result = run_cli("--help")
    assert result.returncode == 0 and "generate" in result.stdout and "make-tiny" in result.stdout
    gen_help = run_cli("generate", "--help").stdout
    for flag in ("--steps", "--seed", "--negative-prompt", "--tensor-parallel-size", "--attention-backend"):
        assert flag in gen_help


def test_memory_flags_reach_the_engine_config():
    from diffserve.entrypoints.cli import build_parser, engine_kwargs

    for command in (["generate", "x"], ["serve"]):
        args = build_parser().parse_args(command + [
            "--enable-cpu-offload", "--enable-layerwise-offload", "--layerwise-prefetch", "2",
            "--vae-use-slicing", "--max-gpu-memory", "23.5",
        ])
        assert engine_kwargs(args) == {"enable_cpu_offload": True, "enable_layerwise_offload": True,
                                       "layerwise_prefetch": 2, "vae_use_slicing": True, "max_gpu_memory": 23.5}


def test_quantization_flags_reach_the_engine_config():
    from diffserve.entrypoints.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["generate", "x", "--quantization", "fp8", "--unquantized-steps", "4"])
    assert engine_kwargs(args) == {"quantization": "fp8", "unquantized_steps": 4}


def test_step_batching_flags_reach_the_engine_config(capsys):
    from diffserve.config import OmniDiffusionConfig
    from diffserve.entrypoints.cli import build_parser, engine_kwargs

    flags = ["--batching", "step", "--step-max-wait", "3", "--step-preemption", "--step-max-batch-tokens", "8192",
             "--step-latency-target-ms", "250", "--step-min-batch-gain", "0.05", "--no-step-overlap-stages"]
    for command in (["generate", "x"], ["serve"]):
        kwargs = engine_kwargs(build_parser().parse_args(command + flags))
        assert kwargs == {"batching": "step", "step_max_wait": 3, "step_preemption": True,
                          "step_max_batch_tokens": 8192, "step_latency_target_ms": 250.0,
                          "step_min_batch_gain": 0.05, "step_overlap_stages": False}
        OmniDiffusionConfig(model="x", **kwargs)  # valid
    assert engine_kwargs(build_parser().parse_args(["serve", "--step-overlap-stages"]))["step_overlap_stages"]
    assert main(["serve", "--batching", "step", "--step-latency-target-ms", "0"]) == 2
    err = capsys.readouterr().err
    assert "step_latency_target_ms must be a positive number of milliseconds (or None), got 0.0" in err
    assert "Traceback" not in err


def test_make_tiny_and_models(tmp_path, capsys):
    assert main(["make-tiny", "flux-schnell", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model_index.json").exists()
    assert main(["models"]) == 0
    assert "FluxPipeline" in capsys.readouterr().out


def test_generate_passes_skip_layer_guidance_flags(tiny_checkpoint, tmp_path, capsys):
    path, out = tiny_checkpoint("sd3.5-medium"), tmp_path / "sd3.png"
    common = ["generate", "--model", path, "a lighthouse", "-o", str(out), "--height", "32", "--width", "48",
              "--steps", "4", "--guidance-scale", "5", "--max-sequence-length", "8", "--disable-progress-bar"]
    # The tiny model has 3 blocks: the flag reaches admission, which names the range.
    assert main([*common, "--skip-guidance-layers", "1", "5"]) == 2
    assert "skip_guidance_layers=[1, 5] is out of range" in capsys.readouterr().err
    assert main([*common, "--skip-guidance-layers", "1", "2", "--skip-layer-guidance-scale", "2.5",
                 "--skip-layer-guidance-stop", "0.6"]) == 0
    assert Image.open(out).size == (48, 32)


def test_generate_with_step_batching(tiny_flux, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "img.png"
    common = ["-o", str(out), "--height", "16", "--width", "16", "--steps", "1", "--max-sequence-length", "8",
              "--disable-progress-bar", "--batching", "step", "--step-max-wait", "2"]
    assert main(["generate", "--model", tiny_flux, "x", "--num-outputs", "2", *common]) == 0
    assert out.exists() and (tmp_path / "img_1.png").exists()
    # A pipeline served through the diffusers adapter does not split its call.
    assert main(["generate", "--model", tiny_checkpoint("pixart-sigma"), "x", *common]) == 2
    err = capsys.readouterr().err
    assert "batching='step' is not supported by PixArtSigmaPipeline" in err and "Traceback" not in err
