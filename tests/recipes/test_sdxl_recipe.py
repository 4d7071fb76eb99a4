"""The SDXL LoRA recipe end to end on the tiny model: a mixed-aspect caption folder in, an adapter that
plain diffusers loads, the resolved config, metrics, a loss plot and sample grids out."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from tuner.config.schema import RunConfig
from tuner.errors import DataError
from tuner.models.sdxl_lora import read_adapter_metadata
from tuner.recipes.sdxl import train_sdxl_lora
from tuner.tiny import build_tiny

# (width, height, colour): squares, landscapes and portraits, so several buckets fill at 64 px.
IMAGES = [
    (64, 64, (200, 30, 30)),
    (72, 64, (30, 200, 30)),
    (128, 40, (30, 30, 200)),
    (120, 36, (200, 200, 30)),
    (40, 128, (200, 30, 200)),
    (36, 120, (30, 200, 200)),
]


@pytest.fixture
def caption_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for index, (width, height, colour) in enumerate(IMAGES):
        Image.new("RGB", (width, height), colour).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a plain colour {index}, flat", encoding="utf-8")
    return folder


def _config(data_dir: Path, output_dir: Path, **sections: dict) -> RunConfig:
    config = {
        "task": "sdxl-lora",
        "model": {"name_or_path": "tiny"},
        "data": {"path": str(data_dir), "resolution": 64, "bucket_step": 32},
        "lora": {"rank": 4, "alpha": 2.0},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 2, "max_steps": 3},
        "output": {"dir": str(output_dir), "log_every": 1, "sample_every": 2, "sample_steps": 2},
        "runtime": {"device": "cpu", "mixed_precision": "no"},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return RunConfig.model_validate(config)


@pytest.mark.slow
def test_cached_run_writes_adapter_config_metrics_plot_and_samples(
    caption_folder: Path, tmp_path: Path, capsys
) -> None:
    output = train_sdxl_lora(_config(caption_folder, tmp_path / "out"))

    adapter = output / "pytorch_lora_weights.safetensors"
    header = read_adapter_metadata(adapter)
    assert header["tuner.base_model"] == "tiny-sdxl" and header["tuner.steps"] == "3"
    assert header["lora_adapter_metadata"]["unet.lora_alpha"] == 2.0
    assert (output / "tuner_config.yaml").is_file()
    assert (output / "loss.png").is_file()
    steps = [json.loads(line).get("step") for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert 3 in steps
    grids = sorted(path.name for path in (output / "samples").glob("*.png"))
    assert "step-000002.png" in grids and "step-000003.png" in grids
    assert any((output / "cache").rglob("*.safetensors"))
    # The bucket histogram is part of the report: landscape and portrait buckets both appear.
    printed = capsys.readouterr().out
    assert "96x32" in printed or "128x32" in printed
    assert "32x96" in printed or "32x128" in printed

    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny("sdxl"))
    pipe.load_lora_weights(output)
    assert any("lora_A" in name for name, _ in pipe.unet.named_parameters())


@pytest.mark.slow
def test_uncached_text_encoder_run_with_ema_and_validation(caption_folder: Path, tmp_path: Path) -> None:
    config = _config(
        caption_folder,
        tmp_path / "out",
        lora={"text_encoder": True, "text_encoder_lr": 5e-4},
        train={"ema_decay": 0.5, "max_steps": 2},
        data={"validation_fraction": 0.34, "caption_dropout": 0.5},
        output={"sample_every": 0, "sample_steps": 1},
    )
    output = train_sdxl_lora(config)
    main = output / "pytorch_lora_weights.safetensors"
    ema = output / "pytorch_lora_weights_ema.safetensors"
    assert main.is_file() and ema.is_file()
    assert read_adapter_metadata(ema)["tuner.ema_decay"] == "0.5"
    weights, ema_weights = load_file(main), load_file(ema)
    assert any(key.startswith("text_encoder_2.") for key in weights)
    assert weights.keys() == ema_weights.keys()
    # The kohya file is written by default, text encoders named as ComfyUI/A1111 read them.
    kohya = load_file(output / "pytorch_lora_weights_kohya.safetensors")
    for prefix in ("lora_unet_", "lora_te1_text_model_encoder_", "lora_te2_text_model_encoder_"):
        assert any(key.startswith(prefix) for key in kohya), prefix
    # EMA lags the trained weights only where training moved them: the text encoders did learn.
    assert any(
        not torch.equal(weights[key], ema_weights[key]) for key in weights if key.startswith("text_encoder.")
    )


def test_dataset_problems_stop_the_run_naming_the_file(caption_folder: Path, tmp_path: Path) -> None:
    (caption_folder / "broken.png").write_bytes(b"not an image")
    (caption_folder / "broken.txt").write_text("broken", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        train_sdxl_lora(_config(caption_folder, tmp_path / "out"))
    assert "broken.png" in raised.value.message


def test_dataset_hash_follows_captions_and_images(caption_folder: Path) -> None:
    from tuner.data.captions import scan_caption_dataset
    from tuner.recipes.sdxl import dataset_hash

    before = dataset_hash(scan_caption_dataset(caption_folder).samples)
    assert dataset_hash(scan_caption_dataset(caption_folder).samples) == before
    (caption_folder / "0.txt").write_text("another caption", encoding="utf-8")
    edited = dataset_hash(scan_caption_dataset(caption_folder).samples)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(caption_folder / "6.png")
    (caption_folder / "6.txt").write_text("new", encoding="utf-8")
    assert len({before, edited, dataset_hash(scan_caption_dataset(caption_folder).samples)}) == 3


def test_ema_weights_are_swapped_in_only_inside_the_block() -> None:
    from tuner.recipes.sdxl import parameters_replaced

    model = torch.nn.Linear(2, 2)
    original = model.weight.detach().clone()
    with parameters_replaced(model, {"weight": torch.zeros(2, 2)}):
        assert torch.equal(model.weight, torch.zeros(2, 2))
    assert torch.equal(model.weight, original)


def _write_layout(layout: str, source: Path, target: Path) -> Path:
    """The caption folder rewritten as a metadata.jsonl / metadata.csv folder or a saved HF dataset."""
    images = sorted(source.glob("*.png"))
    captions = [image.with_suffix(".txt").read_text(encoding="utf-8") for image in images]
    target.mkdir()
    if layout == "hf-dataset":
        import datasets

        rows = {"image": [Image.open(image) for image in images], "text": captions}
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(target))
        return target
    for image in images:
        (target / image.name).write_bytes(image.read_bytes())
    if layout == "metadata-jsonl":
        lines = [json.dumps({"file_name": i.name, "text": c}) for i, c in zip(images, captions, strict=True)]
        (target / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        with open(target / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "text"])
            writer.writerows(
                [image.name, caption.strip()] for image, caption in zip(images, captions, strict=True)
            )
    return target


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["metadata-jsonl", "metadata-csv", "hf-dataset"])
def test_each_dataset_layout_trains(caption_folder: Path, tmp_path: Path, layout: str) -> None:
    data = _write_layout(layout, caption_folder, tmp_path / layout)
    output = train_sdxl_lora(
        _config(data, tmp_path / "run", train={"max_steps": 2}, output={"sample_every": 0, "sample_steps": 1})
    )
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_trains_from_a_single_file_checkpoint(caption_folder: Path, tmp_path: Path, monkeypatch) -> None:
    from tuner.formats.kohya import read_safetensors
    from tuner.formats.sdxl_single_file import save_sdxl_single_file

    tiny = build_tiny("sdxl")
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny)
    checkpoint = tmp_path / "tiny-sdxl.safetensors"
    save_sdxl_single_file(
        checkpoint, pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2
    )
    monkeypatch.chdir(tmp_path)  # the base given as a relative path, as users type it
    config = _config(
        caption_folder,
        tmp_path / "run",
        model={"name_or_path": checkpoint.name, "single_file_config": str(tiny)},
        train={"max_steps": 2},
        output={"sample_every": 0, "sample_steps": 1},
    )
    output = train_sdxl_lora(config)
    # The kohya file names the base by its absolute path and with kohya's two hashes of it (sd-scripts'
    # formulas: tests/formats/test_kohya.py checks base_model_hashes against them).
    _, header = read_safetensors(output / "pytorch_lora_weights_kohya.safetensors")
    full = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with open(checkpoint, "rb") as file:
        file.seek(0x100000)
        short = hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
    assert header["ss_sd_model_name"] == header["tuner.base_model"] == str(checkpoint)
    assert header["ss_sd_model_hash"] == short and header["ss_new_sd_model_hash"] == full
    # The adapter trained on the single file loads onto the folder model it was exported from.
    folder_pipeline = StableDiffusionXLPipeline.from_pretrained(tiny)
    folder_pipeline.load_lora_weights(output)
    assert any("lora" in name for name, _ in folder_pipeline.unet.named_parameters())


@pytest.mark.slow
def test_channels_last_trains_the_same_adapter(caption_folder: Path, tmp_path: Path) -> None:
    # Another memory layout, the same arithmetic: only float rounding may tell the two runs apart.
    adapters = []
    for channels_last in (False, True):
        config = _config(
            caption_folder,
            tmp_path / f"out-{channels_last}",
            runtime={"channels_last": channels_last},
            output={"sample_every": 0, "sample_steps": 1},
        )
        adapters.append(load_file(train_sdxl_lora(config) / "pytorch_lora_weights.safetensors"))
    contiguous, channels_last = adapters
    assert contiguous.keys() == channels_last.keys()
    worst = max((contiguous[key] - channels_last[key]).abs().max().item() for key in contiguous)
    assert worst < 1e-4, worst
    assert any(contiguous[key].abs().max() > 1e-3 for key in contiguous if "lora_B" in key or "up" in key)


@pytest.mark.slow
def test_a_v_prediction_run_samples_and_records_v_prediction(
    caption_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """Sample grids, the adapter's header (and its kohya copy) and `tuner infer` all follow the trained
    prediction type; the tiny model's scheduler predicts epsilon."""
    from tuner.models import sdxl_infer, sdxl_sampling
    from tuner.models.sdxl_infer import Adapter, GenerationSettings, infer_sdxl, trained_prediction_type

    schedulers: list[str] = []

    def recording(build):
        def build_pipeline(*args, **kwargs):
            pipeline = build(*args, **kwargs)
            schedulers.append(pipeline.scheduler.config.prediction_type)
            return pipeline

        return build_pipeline

    monkeypatch.setattr(sdxl_sampling, "build_pipeline", recording(sdxl_sampling.build_pipeline))
    monkeypatch.setattr(sdxl_infer, "build_pipeline", recording(sdxl_infer.build_pipeline))
    config = _config(
        caption_folder,
        tmp_path / "out",
        train={"max_steps": 1, "prediction_type": "v_prediction"},
        output={"sample_every": 0, "sample_steps": 1, "save_format": "both"},
    )
    output = train_sdxl_lora(config)
    assert schedulers[-1] == "v_prediction"  # the final sample grid (the first pipeline encoded prompts)

    adapter = output / "pytorch_lora_weights.safetensors"
    kohya = output / "pytorch_lora_weights_kohya.safetensors"
    assert read_adapter_metadata(adapter)["tuner.prediction_type"] == "v_prediction"
    assert read_adapter_metadata(kohya)["ss_v_parameterization"] == "True"
    assert trained_prediction_type([Adapter(output)]) == "v_prediction"
    assert trained_prediction_type([Adapter(kohya)]) == "v_prediction"

    settings = GenerationSettings(
        prompt="a plain colour", steps=1, size=(64, 64), model="tiny", adapters=[Adapter(adapter)]
    )
    infer_sdxl(settings, tmp_path / "infer.png", device="cpu", mixed_precision="no")
    assert schedulers[-1] == "v_prediction"


def test_duplicate_images_train_with_a_warning(caption_folder: Path, tmp_path: Path, capsys) -> None:
    from tuner.recipes.sdxl import load_training_portions

    # The same picture twice, with two captions: kohya and diffusers train on both.
    (caption_folder / "copy.png").write_bytes((caption_folder / "0.png").read_bytes())
    (caption_folder / "copy.txt").write_text("the same colour, another caption", encoding="utf-8")
    samples = [
        s for p in load_training_portions(_config(caption_folder, tmp_path / "out")) for s in p.samples
    ]
    assert len(samples) == len(IMAGES) + 1
    printed = capsys.readouterr().out
    copy = caption_folder / "copy.png"
    assert f"warning: {copy}: image {copy} has the same content as {caption_folder / '0.png'}" in printed
    assert not (tmp_path / "out" / "skipped.jsonl").exists()


# The tensor each variant adds to or puts in place of LoRA's, in tuner's file and in the kohya file.
VARIANT_TENSORS = {
    "dora": ("lora_magnitude_vector", ".dora_scale"),
    "lokr": (".lokr_w1", ".lokr_w1"),
    "loha": (".hada_w1_a", ".hada_w1_a"),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANT_TENSORS))
def test_lora_variant_run_resumes_exactly_and_exports_to_kohya(
    caption_folder: Path, tmp_path: Path, variant: str
) -> None:
    sections = {
        "lora": {"variant": variant},
        "output": {"sample_every": 0, "checkpoint_every": 1},
        "data": {"caption_prefix": "sks"},
    }
    straight = train_sdxl_lora(
        _config(caption_folder, tmp_path / "straight", train={"max_steps": 2}, **sections)
    )
    split = tmp_path / "split"
    train_sdxl_lora(_config(caption_folder, split, train={"max_steps": 1}, **sections))
    train_sdxl_lora(_config(caption_folder, split, train={"max_steps": 2}, **sections), resume="latest")
    expected = load_file(straight / "pytorch_lora_weights.safetensors")
    resumed = load_file(split / "pytorch_lora_weights.safetensors")
    ours, kohya_suffix = VARIANT_TENSORS[variant]
    variant_keys = [key for key in expected if key.endswith(ours)]
    assert variant_keys and expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    assert read_adapter_metadata(split / "pytorch_lora_weights.safetensors")["tuner.variant"] == variant
    kohya = load_file(split / "pytorch_lora_weights_kohya.safetensors")
    assert sum(key.endswith(kohya_suffix) for key in kohya) == len(variant_keys)
    # The run's record as ComfyUI, A1111 and Forge show it (ss_* / modelspec keys).
    header = read_adapter_metadata(straight / "pytorch_lora_weights_kohya.safetensors")
    assert header["ss_sd_model_name"] == "tiny-sdxl" and header["ss_resolution"] == "(64, 64)"
    assert (header["ss_steps"], header["ss_num_epochs"], header["ss_num_train_images"]) == ("2", "1", "6")
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "2")
    assert header["modelspec.trigger_phrase"] == "sks" and header["tuner.variant"] == variant
    tags = json.loads(header["ss_tag_frequency"])
    assert tags == {"data": {**{f"a plain colour {index}": 1 for index in range(len(IMAGES))}, "flat": 6}}


@pytest.mark.slow
def test_lora_plus_smooth_l1_zero_terminal_snr_and_long_captions_resume_exactly(
    caption_folder: Path, tmp_path: Path
) -> None:
    # Issue #27's options together: the optimizer's LoRA+ groups, the loss and the schedule are rebuilt
    # from the config on resume and must continue the run exactly.
    train = {"prediction_type": "v_prediction", "zero_terminal_snr": True, "loss": "smooth_l1"}
    sections = {
        "lora": {"lr_ratio": 16.0},
        "data": {"max_caption_tokens": 150},
        "output": {"sample_every": 0, "checkpoint_every": 1},
    }
    straight = train_sdxl_lora(
        _config(caption_folder, tmp_path / "straight", train={**train, "max_steps": 2}, **sections)
    )
    split = tmp_path / "split"
    train_sdxl_lora(_config(caption_folder, split, train={**train, "max_steps": 1}, **sections))
    train_sdxl_lora(
        _config(caption_folder, split, train={**train, "max_steps": 2}, **sections), resume="latest"
    )
    expected = load_file(straight / "pytorch_lora_weights.safetensors")
    resumed = load_file(split / "pytorch_lora_weights.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    header = read_adapter_metadata(split / "pytorch_lora_weights.safetensors")
    assert (header["tuner.loss"], header["tuner.lr_ratio"], header["tuner.zero_terminal_snr"]) == (
        "smooth_l1",
        "16.0",
        "True",
    )
