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


def test_help_documents_commands_and_flags():
    result = run_cli("--help")
    assert result.returncode == 0 and "generate" in result.stdout and "make-tiny" in result.stdout
    gen_help = run_cli("generate", "--help").stdout
    for flag in ("--steps", "--seed", "--negative-prompt", "--tensor-parallel-size", "--attention-backend"):
        assert flag in gen_help


def test_make_tiny_and_models(tmp_path, capsys):
    assert main(["make-tiny", "flux-schnell", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model_index.json").exists()
    assert main(["models"]) == 0
    assert "FluxPipeline" in capsys.readouterr().out
