import json

import pytest
import torch
from formats.sdxl_lora_files import write_adapter
from PIL import Image

from tuner.errors import ModelError
from tuner.models import sdxl_merge
from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_infer import (
    Adapter,
    GenerationSettings,
    build_pipeline,
    generate,
    infer_sdxl,
    load_adapters,
)

SETTINGS = {"prompt": "a blue circle", "steps": 2, "size": (64, 64), "guidance": 2.0}


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    first = root / "first"
    second = root / "second"
    write_adapter(tiny_model("sdxl"), first, seed=1, alpha=3.0, text_encoder=True)
    write_adapter(tiny_model("sdxl"), second, seed=2, alpha=8.0, targets="attention")
    return first, second


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


def _render(folder, adapters=(), scales=None) -> torch.Tensor:
    components = load_sdxl(str(folder))
    pipeline = build_pipeline(components)
    names = load_adapters(
        pipeline, [Adapter(path, scale) for path, scale in zip(adapters, scales or [], strict=False)]
    )
    assert len(names) == len(adapters)
    return _pixels(generate(pipeline, components, GenerationSettings(**SETTINGS))[0])


def test_stacked_adapters_match_diffusers_set_adapters(tiny_model, adapters):
    ours = _render(tiny_model("sdxl"), adapters, [0.7, 0.4])
    components = load_sdxl(str(tiny_model("sdxl")))
    pipeline = build_pipeline(components)
    for name, path in zip(("a", "b"), adapters, strict=True):
        pipeline.load_lora_weights(str(path), adapter_name=name)
    pipeline.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    reference = _pixels(generate(pipeline, components, GenerationSettings(**SETTINGS))[0])
    assert torch.equal(ours, reference)
    assert (ours - _render(tiny_model("sdxl"), adapters, [1.0, 1.0])).abs().max() > 1


def test_merged_pipeline_renders_like_base_plus_adapter(tiny_model, adapters, tmp_path):
    merged = sdxl_merge.merge_sdxl_adapter(
        str(tiny_model("sdxl")), adapters[0], tmp_path / "merged", dtype="fp32"
    )
    assert (merged / "model_index.json").is_file() and any((merged / "unet").glob("*.safetensors"))
    with_adapter = _render(tiny_model("sdxl"), [adapters[0]], [1.0])
    assert (with_adapter - _render(merged)).abs().max() <= 1
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_single_file_merge_loads_with_from_single_file(tiny_model, adapters, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from tuner.tiny import sdxl as tiny_sdxl

    base = tmp_path / "base"
    tiny_sdxl.build(base)
    adapter = write_adapter(base, tmp_path / "adapter", alpha=3.0, text_encoder=True).parent
    checkpoint = sdxl_merge.merge_sdxl_adapter(
        str(base), adapter, tmp_path / "model.safetensors", single_file=True
    )
    assert checkpoint.is_file()
    loaded = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(base))
    merged = sdxl_merge.merge_sdxl_adapter(str(base), adapter, tmp_path / "folder")
    reference = StableDiffusionXLPipeline.from_pretrained(merged)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (part, key)


def test_adapter_for_another_architecture_is_refused_before_writing(tiny_model, tmp_path, monkeypatch):
    from tuner.tiny import sdxl as tiny_sdxl

    monkeypatch.setattr(tiny_sdxl, "TEXT_ENCODER_2_HIDDEN", 64)
    other = tmp_path / "other"
    tiny_sdxl.build(other)
    adapter = write_adapter(other, tmp_path / "adapter", base_model="other").parent
    with pytest.raises(ModelError, match="does not fit the base model"):
        sdxl_merge.merge_sdxl_adapter(str(tiny_model("sdxl")), adapter, tmp_path / "out" / "merged")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_interrupted_merge_leaves_no_output(tiny_model, adapters, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    original = StableDiffusionXLPipeline.save_pretrained

    def save_then_fail(self, folder, **kwargs):
        original(self, folder, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionXLPipeline, "save_pretrained", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        sdxl_merge.merge_sdxl_adapter(str(tiny_model("sdxl")), adapters[1], tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_infer_writes_pngs_with_text_chunk_and_compare_grid(tiny_model, adapters, tmp_path):
    settings = GenerationSettings(
        **{**SETTINGS, "num_images": 2, "seed": 5},
        model=str(tiny_model("sdxl")),
        adapters=[Adapter(adapters[1], 0.5)],
    )
    written = infer_sdxl(settings, tmp_path / "out", device="cpu", mixed_precision="no", compare=True)
    names = sorted(path.name for path in written)
    assert names == ["compare.png", "grid.png", "seed-5.png", "seed-6.png"]
    image = Image.open(tmp_path / "out" / "seed-6.png")
    assert image.text["prompt"] == "a blue circle" and image.text["seed"] == "6"
    assert json.loads(image.text["adapters"]) == [{"path": str(adapters[1]), "scale": 0.5}]
    assert "Seed: 6" in image.text["parameters"]
    compare = Image.open(tmp_path / "out" / "compare.png")
    assert compare.size[0] == 2 * 64 and compare.size[1] > 2 * 64
    top, bottom = compare.crop((0, 16, 64, 80)), compare.crop((0, 96, 64, 160))
    assert (_pixels(top) - _pixels(bottom)).abs().max() > 1  # base and adapted rows differ


def test_merge_and_infer_print_only_what_the_user_should_read(tiny_model, adapters, tmp_path):
    import logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to root
    warnings: list[str] = []
    try:
        # A UNet-only adapter, recorded as trained on tiny-sdxl, merged into `tiny`: the same model.
        sdxl_merge.merge_sdxl_adapter(
            "tiny", adapters[1], tmp_path / "merged", dtype="bf16", warn=warnings.append
        )
        settings = GenerationSettings(**SETTINGS, model="tiny", adapters=[Adapter(adapters[1])])
        infer_sdxl(settings, tmp_path / "one.png", device="cpu", mixed_precision="no")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert warnings == []
    assert not [r for r in records if "No LoRA keys" in r or "kept in float32: []" in r], records


def test_single_file_merge_streams_and_equals_the_pipeline_merge(tiny_model, adapters, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from tuner.formats.kohya import export_kohya
    from tuner.formats.sdxl_single_file import sdxl_original_state_dict

    base = str(tiny_model("sdxl"))
    # A kohya file with text-encoder LoRA, at 0.7, in bf16: scales, names and the cast all count.
    kohya = export_kohya(adapters[0], tmp_path / "k.safetensors")
    folder = sdxl_merge.merge_sdxl_adapter(base, kohya, tmp_path / "folder", scale=0.7, dtype="bf16")
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    expected = sdxl_original_state_dict(
        reference.unet, reference.vae, reference.text_encoder, reference.text_encoder_2
    )

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the single-file merge loaded the whole pipeline")

    monkeypatch.setattr(sdxl_merge, "load_sdxl", no_pipeline)
    checkpoint = sdxl_merge.merge_sdxl_adapter(
        base, kohya, tmp_path / "m.safetensors", scale=0.7, dtype="bf16", single_file=True
    )
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert set(handle.keys()) == set(expected)
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        for key, value in expected.items():
            ours = handle.get_tensor(key)
            assert ours.dtype == torch.bfloat16, key
            torch.testing.assert_close(ours.float(), value.float(), rtol=0, atol=0, msg=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "k.safetensors", "m.safetensors"]


def test_single_file_merge_holds_one_weight_group_at_a_time(tiny_model, adapters, tmp_path, monkeypatch):
    """Every weight of all four parts is read on its own and dropped once written: at no point are more
    read tensors alive than OpenCLIP's q/k/v group and the one being read (the peak memory of a full-size
    merge is measured in docs/benchmarks.md)."""
    import weakref

    from tuner.formats.safetensors_stream import read_header

    alive: set[int] = set()
    most = 0
    read: list[str] = []

    def tracked(path):
        nonlocal most
        for name, tensor in sdxl_merge_read_tensors(path):
            read.append(f"{path.parent.name}/{name}")
            alive.add(id(tensor))
            weakref.finalize(tensor, alive.discard, id(tensor))
            most = max(most, len(alive))
            yield name, tensor
            del tensor

    sdxl_merge_read_tensors = sdxl_merge.read_tensors
    monkeypatch.setattr(sdxl_merge, "read_tensors", tracked)
    base = tiny_model("sdxl")
    sdxl_merge.merge_sdxl_adapter(str(base), adapters[0], tmp_path / "m.safetensors", single_file=True)
    stored = [
        f"{part}/{name}"
        for part in ("unet", "vae", "text_encoder", "text_encoder_2")
        for file in sorted((base / part).glob("*.safetensors"))
        for name in read_header(file)
    ]
    assert sorted(read) == sorted(stored)
    assert most <= 4, most
