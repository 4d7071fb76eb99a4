import pytest
from formats.sdxl_lora_files import write_adapter
from PIL import Image

from tuner.cli.main import main


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    write_adapter(tiny_model("sdxl"), folder, targets="attention")
    return folder


def test_infer_compare_merge_and_convert_from_the_command_line(tiny_model, adapter, tmp_path, capsys):
    model = str(tiny_model("sdxl"))
    main(["infer", "sdxl", "--model", model, "--adapter", str(adapter), "--adapter-scale", "0.5",
          "--prompt", "a red square", "--steps", "2", "--size", "64x64", "--compare", "--device", "cpu",
          "--out", str(tmp_path / "one.png")])  # fmt: skip
    assert Image.open(tmp_path / "one.png").text["model"] == model
    assert (tmp_path / "compare.png").is_file()
    main(["convert", "--to", "kohya", str(adapter), str(tmp_path / "k.safetensors")])
    main(["merge", "--base", model, "--adapter", str(tmp_path / "k.safetensors"), "--output",
          str(tmp_path / "merged"), "--dtype", "bf16"])  # fmt: skip
    assert (tmp_path / "merged" / "unet" / "config.json").is_file()
    assert "merged model:" in capsys.readouterr().out


def test_user_errors_exit_2_with_a_hint(tiny_model, adapter, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "infer",
                "sdxl",
                "--model",
                "tiny",
                "--prompt",
                "x",
                "--adapter-scale",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code == 2 and "hint:" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        main(["merge", "--base", "tiny", "--adapter", str(adapter), "--output", str(tmp_path / "taken")])
    assert "already exists" in capsys.readouterr().err
