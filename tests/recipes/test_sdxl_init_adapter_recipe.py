"""`lora.init_adapter` / `--init-adapter` (issue #27 item 4): an SDXL run that starts from an existing LoRA
file (tuner's, diffusers' older naming, kohya's) starts where that file is, as diffusers' own
`load_lora_weights` puts it, continues it on resume, records it, and refuses files and flags that do
not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.cli_runner import run_cli
from tests.formats.sdxl_lora_files import write_adapter
from tuner.config.schema import RunConfig
from tuner.formats.kohya import export_kohya
from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_lora import add_lora, lora_config, read_adapter_metadata, unet_target_modules
from tuner.recipes import sdxl as sdxl_recipe
from tuner.recipes.sdxl import train_sdxl_lora


@pytest.fixture
def caption_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a plain colour {index}", encoding="utf-8")
    return folder


def _config(data_dir: Path, output_dir: Path, init_adapter: Path, **sections: dict) -> RunConfig:
    config = {
        "task": "sdxl-lora",
        "model": {"name_or_path": "tiny"},
        "data": {"path": str(data_dir), "resolution": 64},
        "lora": {"init_adapter": str(init_adapter)},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "train": {"batch_size": 2, "max_steps": 1},
        "output": {"dir": str(output_dir), "sample_every": 0},
        "runtime": {"device": "cpu", "mixed_precision": "no"},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return RunConfig.model_validate(config)


def _diffusers_file(model: Path, folder: Path) -> Path:
    """The older diffusers naming (`unet.<module>.lora.down.weight`), no config in the header: what the
    diffusers SDXL LoRA example script saves; alpha is then taken to equal the rank."""
    torch.manual_seed(1)
    components = load_sdxl(str(model))
    add_lora(components.unet, lora_config(unet_target_modules(["attention"]), rank=2, alpha=2.0))
    with torch.no_grad():
        for name, parameter in components.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(components.unet))
    assert any(".lora.down." in key for key in layers)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


def _adapter(kind: str, model: Path, folder: Path) -> Path:
    if kind == "diffusers":
        return _diffusers_file(model, folder)
    tuner_file = write_adapter(model, folder, targets="attention+ffn", rank=4, alpha=3.0)
    if kind == "kohya":  # kohya's module names (SGM blocks) and `.alpha` tensors
        return export_kohya(tuner_file, folder / "style_kohya.safetensors")
    return tuner_file


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    with torch.no_grad():
        return unet(
            torch.randn(1, config.in_channels, 8, 8, generator=generator),
            torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 77, config.cross_attention_dim, generator=generator),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, text_dim, generator=generator),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
            },
        ).sample


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tuner", "diffusers", "kohya"])
def test_run_starts_where_the_adapter_is(
    caption_folder: Path, tmp_path: Path, tiny_model, monkeypatch, kind: str
) -> None:
    model = tiny_model("sdxl")
    adapter = _adapter(kind, model, tmp_path / "adapter")
    started: list[torch.Tensor] = []
    build_groups = sdxl_recipe.lora_plus_groups

    def record_start(groups, models, *args):  # the UNet as the optimizer receives it, before step 1
        started.append(_unet_output(models[0]))
        return build_groups(groups, models, *args)

    monkeypatch.setattr(sdxl_recipe, "lora_plus_groups", record_start)
    # lr 1e-12 for one step: the saved adapter is the input one, as far as fp32 can tell.
    output = train_sdxl_lora(
        _config(
            caption_folder, tmp_path / "run", adapter, optim={"lr": 1e-12}, output={"save_format": "both"}
        )
    )
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(model))
    base = _unet_output(pipeline.unet)
    pipeline.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    expected = _unet_output(pipeline.unet)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(started[0], expected, rtol=1e-5, atol=1e-5)

    # The adapter the run saves is the one it started from (the UNet output after 1 step of lr 1e-12).
    trained = StableDiffusionXLPipeline.from_pretrained(str(model))
    trained.load_lora_weights(str(output), weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(_unet_output(trained.unet), expected, rtol=1e-5, atol=1e-5)
    if kind == "tuner":
        saved, given = load_file(output / "pytorch_lora_weights.safetensors"), load_file(adapter)
        assert saved.keys() == given.keys()
        for key in given:
            torch.testing.assert_close(saved[key], given[key], rtol=0, atol=1e-8, msg=key)
    header = read_adapter_metadata(output / "pytorch_lora_weights.safetensors")
    rank, alpha, targets = ("2", "2.0", "attention") if kind == "diffusers" else ("4", "3.0", "attention+ffn")
    assert (header["tuner.rank"], header["tuner.alpha"], header["tuner.targets"]) == (rank, alpha, targets)
    assert header["tuner.init_adapter"] == adapter.name
    kohya = read_adapter_metadata(output / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["ss_network_weights"] == adapter.name
    assert (kohya["ss_network_dim"], kohya["ss_network_alpha"]) == (rank, alpha.removesuffix(".0"))


def _text_outputs(encoders) -> list[torch.Tensor]:
    # Token ids that exist in the tiny vocabulary as well as in CLIP's.
    ids = torch.tensor([[0, 7, 11, 13, 2]])
    with torch.no_grad():
        return [encoder(ids, output_hidden_states=True).hidden_states[-2] for encoder in encoders]


@pytest.mark.slow
def test_text_encoder_lora_starts_where_the_file_is(
    caption_folder: Path, tmp_path: Path, tiny_model, monkeypatch
) -> None:
    model = tiny_model("sdxl")
    adapter = write_adapter(
        model, tmp_path / "adapter", targets="attention", rank=4, alpha=3.0, text_encoder=True
    )
    started: list[list[torch.Tensor]] = []
    build_groups = sdxl_recipe.lora_plus_groups

    def record_start(groups, models, *args):
        started.append(_text_outputs(models[1:]))
        return build_groups(groups, models, *args)

    monkeypatch.setattr(sdxl_recipe, "lora_plus_groups", record_start)
    train_sdxl_lora(_config(caption_folder, tmp_path / "run", adapter, lora={"text_encoder": True}))
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(model))
    base = _text_outputs([pipeline.text_encoder, pipeline.text_encoder_2])
    pipeline.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    expected = _text_outputs([pipeline.text_encoder, pipeline.text_encoder_2])
    for ours, theirs, plain in zip(started[0], expected, base, strict=True):
        assert not torch.allclose(theirs, plain, atol=1e-4)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_run_from_an_adapter_resumes_exactly(caption_folder: Path, tmp_path: Path, tiny_model) -> None:
    # The checkpoint, not the file, is where a resumed run continues: re-applying the file over it would
    # make the split run differ from the straight one.
    adapter = write_adapter(tiny_model("sdxl"), tmp_path / "adapter", targets="attention", rank=4, alpha=3.0)
    output = {"checkpoint_every": 1}
    straight = train_sdxl_lora(
        _config(caption_folder, tmp_path / "straight", adapter, train={"max_steps": 2}, output=output)
    )
    split = tmp_path / "split"
    train_sdxl_lora(_config(caption_folder, split, adapter, train={"max_steps": 1}, output=output))
    train_sdxl_lora(
        _config(caption_folder, split, adapter, train={"max_steps": 2}, output=output), resume="latest"
    )
    expected = load_file(straight / "pytorch_lora_weights.safetensors")
    resumed = load_file(split / "pytorch_lora_weights.safetensors")
    given = load_file(adapter)
    assert expected.keys() == resumed.keys() == given.keys()
    assert any(not torch.equal(expected[key], given[key]) for key in given)  # the two steps trained it
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


def _cli(capsys, caption_folder: Path, output: Path, adapter: Path, *extra: str) -> tuple[int, str]:
    code, out, err = run_cli(
        capsys,
        "train",
        "sdxl-lora",
        "--model",
        "tiny",
        "--data",
        str(caption_folder),
        "--output",
        str(output),
        "--init-adapter",
        str(adapter),
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--set",
        "data.resolution=64",
        *extra,
    )
    return code, out + err


def _rewritten(source: Path, target: Path, change) -> Path:
    tensors = load_file(source)
    change(tensors)
    save_file(tensors, str(target))
    return target


@pytest.mark.slow
def test_the_cli_refuses_what_does_not_fit_the_file(
    caption_folder: Path, tmp_path: Path, tiny_model, capsys
) -> None:
    model = tiny_model("sdxl")
    adapter = write_adapter(model, tmp_path / "adapter", targets="attention+ffn", rank=4, alpha=3.0)
    key = next(key for key in load_file(adapter) if key.endswith("to_q.lora_A.weight"))

    def foreign(tensors):  # a module the SDXL UNet does not have
        tensors["unet.joint_blocks.0.attn.qkv.lora_A.weight"] = tensors[key].clone()
        tensors["unet.joint_blocks.0.attn.qkv.lora_B.weight"] = tensors[
            key.replace("lora_A", "lora_B")
        ].clone()

    def wider(tensors):  # another model's width (SD1.5's attention is 320/640/1280 wide)
        tensors[key] = torch.zeros(4, tensors[key].shape[1] + 8)

    lokr = write_adapter(model, tmp_path / "lokr", variant="lokr")
    with_text = write_adapter(model, tmp_path / "text", text_encoder=True)
    cases = [
        (adapter, ["--rank", "8"], "lora.rank=8 contradicts lora.init_adapter"),
        (adapter, ["--set", "lora.targets=[attention]"], "which adapts attention+ffn"),
        (
            _rewritten(adapter, tmp_path / "foreign.safetensors", foreign),
            [],
            "key unet.joint_blocks.0.attn.qkv",
        ),
        (_rewritten(adapter, tmp_path / "wider.safetensors", wider), [], "does not fit the base model"),
        (lokr, [], "is not a plain LoRA"),
        (with_text, [], "adapts the text encoders"),
        (adapter, ["--set", "lora.variant=dora"], "lora.variant='dora' does not apply"),
        (tmp_path / "missing.safetensors", [], "is not a file"),
    ]
    for number, (file, extra, message) in enumerate(cases):
        code, text = _cli(capsys, caption_folder, tmp_path / f"out{number}", file, *extra)
        assert code == 2, text
        assert message in text, text
    # Set to what the file holds, the same flags are accepted.
    code, text = _cli(capsys, caption_folder, tmp_path / "agrees", adapter, "--rank", "4", "--alpha", "3")
    assert code == 0, text
