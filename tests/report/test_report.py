"""`tuner report`: a self-contained report.html, checked as text and in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from cli_runner import run_cli
from PIL import Image

from tuner.report.html import write_run_report
from tuner.report.svg import nice_ticks

SAMPLE_COLOUR = (255, 0, 255)  # a colour nothing else on the page uses
LOSS_COLOUR = (0x1F, 0x77, 0xB4)
RIGHT_ANSWER_COLOUR = (0xE7, 0xF5, 0xE9)  # td.right in the report's style
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as a Qwen-VL run with eval and an SDXL-style sample grid leaves it (mid-write)."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    config = {"task": "qwenvl-lora", "model": {"name_or_path": "tiny"}, "train": {"max_steps": 40}}
    (run / "tuner_config.yaml").write_text(yaml.safe_dump(config))
    with open(run / "metrics.jsonl", "w") as handle:
        for step in range(5, 45, 5):
            record = {
                "step": step,
                "loss": 9.0 / step,
                "lr": 1e-3,
                "samples_per_s": 2.0,
                "peak_memory_mb": 900,
            }
            handle.write(json.dumps(record) + "\n")
            if step % 20 == 0:
                handle.write(json.dumps({"step": step, "validation_loss": 5.0 / step}) + "\n")
                handle.write(
                    json.dumps({"step": step, "eval/anls": step / 50, "eval/overall": step / 80}) + "\n"
                )
        handle.write('{"step": 45, "loss": 0.')  # the line training is writing right now
    Image.new("RGB", (64, 64), SAMPLE_COLOUR).save(run / "samples" / "step-000040.png")
    answer = {
        "step": 40,
        "question": "What is <b>in</b> it?",
        "answer": "A red square.",
        "reference": "A red square.",
    }
    (run / "samples" / "answers.jsonl").write_text(json.dumps(answer) + "\n")
    (run / "skipped.jsonl").write_text(json.dumps({"index": 3, "why": "truncated PNG"}) + "\n")
    return run


def test_report_embeds_everything_and_fetches_nothing(run_dir):
    environment = {"device_type": "cpu", "device_count": 1, "versions": {"torch": "2.14.1"}}
    html = write_run_report(run_dir, environment).read_text()
    assert "<script" not in html and "<link" not in html
    # The only URL is the SVG namespace; images are data URIs.
    assert set(re.findall(r"https?://[^\s\"')]+", html)) == {"http://www.w3.org/2000/svg"}
    assert re.findall(r'<img[^>]+src="([^"]{0,22})', html) == ["data:image/png;base64,"]
    assert html.count("<svg") >= 5  # loss+validation, lr, throughput, memory, eval metrics
    assert "validation loss" in html and "evaluation during training" in html
    assert "What is &lt;b&gt;in&lt;/b&gt; it?" in html  # answers are escaped
    assert "truncated PNG" in html and "max_steps: 40" in html and "40 / 40" in html
    assert "torch 2.14.1" in html
    # The environment is kept beside the run, so a later report (another machine) shows the training one.
    assert "torch 2.14.1" in write_run_report(run_dir, {"versions": {"torch": "0.0"}}).read_text()


def test_instance_and_prior_losses_are_drawn_in_the_loss_chart(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": step, "loss": 1.0 / step, "loss/instance": 0.9 / step, "loss/prior": 1.2 / step}
        for step in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    html = write_run_report(run, None).read_text()
    loss_chart = html[html.index('aria-label="loss"') : html.index("</svg>", html.index('aria-label="loss"'))]
    assert "instance loss" in loss_chart and "prior loss" in loss_chart
    assert 'aria-label="loss/prior"' not in html  # not a chart of its own


def test_nice_ticks_cover_the_range_in_round_steps():
    assert nice_ticks(0.3, 9.0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert nice_ticks(1086.5, 1087.2) == pytest.approx([1086.4, 1086.6, 1086.8, 1087.0, 1087.2])
    # A flat series (a constant learning rate) gets a range above its value.
    assert nice_ticks(0.01, 0.01) == pytest.approx([0.01, 0.012, 0.014, 0.016, 0.018, 0.02])


def test_report_command_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "report", str(tmp_path))
    assert code == 2 and "not a training output folder" in stderr


def _browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.mark.skipif(_browser() is None, reason="no chromium here (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_errors(run_dir, tmp_path):
    _write_eval_answers(run_dir)
    page = write_run_report(run_dir, {"device_type": "cpu", "device_count": 1})
    screenshot = tmp_path / "report.png"
    command = [
        _browser(),
        *("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"),
        *("--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"),
        *("--enable-logging=stderr", "--v=0", "--window-size=1100,2400", f"--screenshot={screenshot}"),
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # Page problems Chromium logs: console messages (script errors), failed loads, blocked resources.
    page_errors = [
        line
        for line in result.stderr.splitlines()
        if re.search(r"CONSOLE|Uncaught|Failed to load resource|net::ERR_|Not allowed to load", line)
    ]
    assert page_errors == []
    image = Image.open(screenshot).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    counts = {colour: count for count, colour in colours}
    assert counts.get(SAMPLE_COLOUR, 0) > 1000  # the embedded sample image is drawn
    assert counts.get(LOSS_COLOUR, 0) > 200  # the curves are drawn
    assert counts.get(RIGHT_ANSWER_COLOUR, 0) > 200  # the side-by-side answers, right ones marked


@pytest.mark.slow
def test_training_refreshes_the_report_at_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(out), "--max-steps", "4"),
        *("--checkpoint-every", "2", "--set", "output.log_every=1"),
    )
    assert code == 0, stderr
    html = (out / "report.html").read_text()
    assert "<svg" in html and "4 / 4" in html and "What is in the picture?" in html
    assert "torch" in (out / "environment.json").read_text()  # recorded by training itself


def _acting_keys_shown(html: str) -> set[str]:
    """The dotted keys in the report's table of keys that act (outside the full-config fold)."""
    table = html[html.index("<table class=keys>") : html.index("<details>")]
    shown = set()
    for section, cells in re.findall(r"<tr><th>([^<]*)</th><td>(.*?)</td></tr>", table):
        names = re.findall(r"<span>(?:<b>)?(\w+):", cells)
        shown |= {f"{section}.{name}" if section else name for name in names}
    return shown


@pytest.mark.parametrize("task", ["qwenvl-lora", "sdxl-lora"])
def test_the_config_shows_the_keys_the_recipe_reads_and_folds_the_rest(tmp_path, task):
    from tuner.config.load import all_keys
    from tuner.config.schema import RunConfig
    from tuner.recipes import qwenvl, sdxl

    run = tmp_path / "run"
    run.mkdir()
    config = RunConfig.model_validate({"task": task, "lora": {"rank": 8}}).model_dump(mode="json")
    (run / "tuner_config.yaml").write_text(yaml.safe_dump(config))
    html = write_run_report(run, None).read_text()
    unused = {"qwenvl-lora": qwenvl.UNUSED_KEYS, "sdxl-lora": sdxl.UNUSED_KEYS}[task]
    # The same list the recipe refuses keys by: every key of the schema but its UNUSED_KEYS.
    assert _acting_keys_shown(html) == {key for key in all_keys() if key not in unused}
    assert "<span><b>rank: 8</b></span>" in html  # set away from the default
    fold = html[html.index("<details>") :]
    assert "full config" in fold and "resolution:" in fold and "max_pixels:" in fold


def test_eval_answers_of_base_and_adapter_are_side_by_side(run_dir):
    _write_eval_answers(run_dir)
    html = write_run_report(run_dir, None).read_text()
    assert (
        "<tr><td>eval.jsonl:1</td><td>What is in the picture?</td><td>A red square.</td>"
        "<td class=wrong>A purple.</td><td class=right>A red square.</td></tr>"
    ) in html
    assert "<td class=wrong>x</td><td class=wrong>A blue square.</td>" in html


def _write_eval_answers(run_dir) -> None:
    """What `tuner eval qwenvl --out RUN/eval` writes for a base model and one adapter, 2 questions."""
    eval_dir = run_dir / "eval"
    eval_dir.mkdir()
    questions = [("A red square.", "A purple.", "A red square."), ("A blue circle.", "x", "A blue square.")]
    for index, name in enumerate(("base", "vl")):
        with open(eval_dir / f"answers-{index}-{name}.jsonl", "w") as handle:
            for number, (reference, *answers) in enumerate(questions, 1):
                score = float(answers[index] == reference)
                record = {"source": f"eval.jsonl:{number}", "question": "What is in the picture?"}
                record |= {"reference": reference, "answer": answers[index], "score": score}
                handle.write(json.dumps(record) + "\n")
    models = [
        {
            "name": name,
            "metrics": {"exact_match": score},
            "overall": score,
            "answers": f"answers-{i}-{name}.jsonl",
        }
        for i, (name, score) in enumerate((("base", 0.0), ("vl", 0.5)))
    ]
    report = {"data": "eval.jsonl", "samples": 2, "metrics": ["exact_match"], "models": models}
    (eval_dir / "eval.json").write_text(json.dumps(report))


def test_a_compare_grid_beside_the_run_is_shown_as_the_before_after_grid(run_dir):
    (run_dir / "infer").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(run_dir / "infer" / "compare.png")
    html = write_run_report(run_dir, {}).read_text()
    assert "before/after (infer/compare.png): base row above, adapter row below" in html
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == 2
