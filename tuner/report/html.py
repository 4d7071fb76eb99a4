"""`tuner report RUN_DIR`: one self-contained `report.html` for a training run.

Everything is inside the file: charts are inline SVG, images are data URIs, there is no script and
nothing is fetched, so a cluster user downloads one file and opens it anywhere. It reads what a run
writes (`metrics.jsonl`, `samples/`, `tuner_config.yaml`, `data_report.txt`, `skipped.jsonl`, the
`eval.json` of `tuner eval ... --out RUN_DIR/eval`) and tolerates a run still in progress (a half-written
last line, missing files). Training refreshes it at every checkpoint.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from tuner.atomic import write_atomically
from tuner.config.keys import keys_that_act
from tuner.config.load import RESOLVED_CONFIG_NAME
from tuner.report.svg import line_chart
from tuner.training.bad_data import SKIPPED_FILE
from tuner.training.metrics import METRICS_FILE, SAMPLES_DIR

REPORT_FILE = "report.html"
ENVIRONMENT_FILE = "environment.json"
EVAL_PREFIX = "eval/"
MAX_SAMPLE_IMAGES = 12
MAX_ANSWER_STEPS = 6
MAX_SKIPPED_SHOWN = 20
MAX_ANSWERS_SIDE_BY_SIDE = 40
# Scalars of a metrics record that are not charted on their own (the step axis and bookkeeping).
_NOT_CHARTED = {"step", "epoch"}
# Parts of the training loss (SDXL with class images: `loss/instance`, `loss/prior`), drawn in the loss chart.
LOSS_PART_PREFIX = "loss/"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
body { padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.muted { color: #666; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 130px; }
.card b { display: block; font-size: 18px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 12px; }
.chart text.title { font-weight: 600; font-size: 13px; }
.chart text.tick { font-size: 11px; fill: #444; }
.chart line.grid { stroke: #e5e5e5; }
figure { display: inline-block; margin: 6px; }
figure img { max-width: 520px; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 12px; }
td.right { background: #e7f5e9; }
td.wrong { background: #fbeaea; }
table.keys td { vertical-align: top; }
table.keys span { display: inline-block; margin-right: 14px; white-space: nowrap; }
details summary { cursor: pointer; color: #333; margin: 8px 0; }
"""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`; a line being written right now (a live run) is skipped."""
    return [
        record
        for record in _read_jsonl(run_dir / METRICS_FILE)
        if isinstance(record.get("step"), int | float)
    ]


def series_of(records: Iterable[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
    ]


VERSIONS_OF = ("torch", "torch_npu", "transformers", "diffusers", "peft", "accelerate", "tuner")


def this_environment() -> dict[str, Any]:
    """The device and library versions of this process (cheap: no device probe beyond torch's own)."""
    import platform
    from importlib import metadata

    import torch

    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONS_OF:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "device_type": accelerator.type if accelerator is not None else "cpu",
        "device_count": torch.accelerator.device_count() if accelerator is not None else 1,
        "versions": versions,
    }


def environment_of(run_dir: Path, environment: dict[str, Any] | None) -> dict[str, Any] | None:
    """The environment recorded beside the run (written by the first report, usually training's own)."""
    path = run_dir / ENVIRONMENT_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
    if environment is not None:
        text = json.dumps(environment, indent=2, default=str)
        write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return environment


def write_run_report(run_dir: str | Path, environment: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/report.html` (atomically: a reader never sees half a file); returns its path.

    `environment` (device, versions: `tuner.runtime.environment_report()`) is stored in
    `environment.json` the first time and read back from there afterwards, so a report made later on
    another machine still shows where the run trained.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    sections = [
        _summary(run_dir, records, environment_of(run_dir, environment)),
        _charts(records),
        _eval_section(run_dir, records),
        _samples_section(run_dir),
        _data_section(run_dir),
        _config_section(run_dir),
    ]
    written = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>tuner run {escape(run_dir.name)}</title><style>{STYLE}</style></head><body>\n"
        f'<h1>Run {escape(run_dir.name)}</h1><p class="muted">{escape(str(run_dir.resolve()))} · '
        f"report written {written} by <code>tuner report</code></p>\n"
        + "\n".join(section for section in sections if section)
        + "\n</body></html>\n"
    )
    path = run_dir / REPORT_FILE
    return write_atomically(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))


def _summary(run_dir: Path, records: list[dict[str, Any]], environment: dict[str, Any] | None) -> str:
    config = _config(run_dir)
    cards = []
    if config:
        cards += [
            ("task", config.get("task")),
            ("model", (config.get("model") or {}).get("name_or_path")),
            ("data", (config.get("data") or {}).get("path")),
        ]
    steps = [r["step"] for r in records if "loss" in r]
    losses = series_of(records, "loss")
    validation = series_of(records, "validation_loss")
    speeds = [y for _, y in series_of(records, "samples_per_s")]
    memory = [y for _, y in series_of(records, "peak_memory_mb")]
    max_steps = ((config or {}).get("train") or {}).get("max_steps")
    cards += [
        ("steps", f"{int(max(steps))}" + (f" / {max_steps}" if max_steps else "") if steps else None),
        ("last loss", f"{losses[-1][1]:.4g}" if losses else None),
        ("best validation loss", f"{min(y for _, y in validation):.4g}" if validation else None),
        ("throughput", f"{sum(speeds) / len(speeds):.3g} samples/s" if speeds else None),
        ("peak memory", f"{max(memory):,.0f} MiB" if memory else None),
        ("adapter saved", "yes" if _finished(run_dir) else "not yet"),
    ]
    if environment:
        cards.append(("device", f"{environment.get('device_type')} × {environment.get('device_count')}"))
        cards.append(("precision", (config or {}).get("runtime", {}).get("mixed_precision")))
    html = ['<div class="cards">']
    html += [
        f'<div class="card"><span class="muted">{escape(name)}</span><b>{escape(str(value))}</b></div>'
        for name, value in cards
        if value is not None
    ]
    html.append("</div>")
    if environment and environment.get("versions"):
        versions = ", ".join(f"{k} {v}" for k, v in environment["versions"].items() if v)
        where = " (recorded by `tuner report`, not by training)" if environment.get("recorded_by") else ""
        html.append(f'<p class="muted">versions{where}: {escape(versions)}</p>')
    return "\n".join(html)


def _finished(run_dir: Path) -> bool:
    return any(
        (run_dir / name).is_file()
        for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
    )


def _charts(records: list[dict[str, Any]]) -> str:
    part_keys = sorted({key for r in records for key in r if key.startswith(LOSS_PART_PREFIX)})
    charts = [
        line_chart(
            "loss",
            {
                name: points
                for name, points in (
                    ("training loss", series_of(records, "loss")),
                    *(
                        (f"{key.removeprefix(LOSS_PART_PREFIX)} loss", series_of(records, key))
                        for key in part_keys
                    ),
                    ("validation loss", series_of(records, "validation_loss")),
                )
                if points
            },
        ),
        line_chart("learning rate", {"lr": series_of(records, "lr")}),
        line_chart("throughput (samples/s)", {"samples/s": series_of(records, "samples_per_s")}),
        line_chart("peak memory (MiB)", {"peak memory": series_of(records, "peak_memory_mb")}),
    ]
    eval_keys = sorted({key for r in records for key in r if key.startswith(EVAL_PREFIX)})
    if eval_keys:
        charts.append(
            line_chart(
                "evaluation during training",
                {key.removeprefix(EVAL_PREFIX): series_of(records, key) for key in eval_keys},
            )
        )
    known = {
        "loss",
        "validation_loss",
        "lr",
        "samples_per_s",
        "peak_memory_mb",
        *_NOT_CHARTED,
        *eval_keys,
        *part_keys,
    }
    others = sorted({key for r in records for key, v in r.items() if key not in known and _number(v)})
    charts += [line_chart(key, {key: series_of(records, key)}) for key in others]
    charts = [chart for chart in charts if chart]
    if not charts:
        return '<h2>Curves</h2><p class="muted">no metrics logged yet</p>'
    return "<h2>Curves</h2>\n" + "\n".join(charts)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _eval_section(run_dir: Path, records: list[dict[str, Any]]) -> str:
    html = []
    eval_file = run_dir / "eval" / "eval.json"
    if eval_file.is_file():
        try:
            report = json.loads(eval_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            report = None
        if report and "metrics" in report:  # tuner eval qwenvl
            html.append(_qwenvl_eval_table(report))
            html.append(_answers_side_by_side(run_dir / "eval", report))
        elif report and "models" in report:  # tuner eval sdxl
            rows = "".join(
                f"<tr><td>{escape(m['name'])}</td><td class=num>{_fmt(m.get('clip_score'))}</td></tr>"
                for m in report["models"]
            )
            html.append(f"<table><tr><th>model</th><th>CLIP score</th></tr>{rows}</table>")
            html += [_figure(path, path.stem) for path in sorted((run_dir / "eval").glob("prompt-*.png"))]
    latest = next((r for r in reversed(records) if any(k.startswith(EVAL_PREFIX) for k in r)), None)
    if latest is not None:
        rows = "".join(
            f"<tr><td>{escape(key.removeprefix(EVAL_PREFIX))}</td><td class=num>{_fmt(value)}</td></tr>"
            for key, value in latest.items()
            if key.startswith(EVAL_PREFIX)
        )
        html.append(f"<p>evaluation at step {latest['step']}:</p><table>{rows}</table>")
    return "<h2>Evaluation</h2>\n" + "\n".join(html) if html else ""


def _qwenvl_eval_table(report: dict[str, Any]) -> str:
    models = report["models"]
    head = "".join(f"<th>{escape(m['name'])}</th>" for m in models)
    rows = [
        f"<tr><td>{escape(metric)}</td>"
        + "".join(f"<td class=num>{_fmt(m['metrics'].get(metric))}</td>" for m in models)
        + "</tr>"
        for metric in report["metrics"]
    ]
    rows.append("<tr><th>overall</th>" + "".join(f"<th>{_fmt(m['overall'])}</th>" for m in models) + "</tr>")
    html = [f"<p>{report['samples']} samples of {escape(str(report['data']))}</p>"]
    html.append(f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>")
    for model in models:
        worst = "".join(
            f"<tr><td class=num>{_fmt(w['score'])}</td><td>{escape(w['question'])}</td>"
            f"<td>{escape(w['answer'])}</td><td>{escape(w['reference'])}</td></tr>"
            for w in model.get("worst", [])
        )
        html.append(
            f"<p>worst samples, {escape(model['name'])}:</p><table><tr><th>score</th><th>question</th>"
            f"<th>answer</th><th>reference</th></tr>{worst}</table>"
        )
    return "\n".join(html)


def _answers_side_by_side(eval_dir: Path, report: dict[str, Any]) -> str:
    """Every model's answer to each question in one row: base and adapters side by side."""
    models = [m for m in report["models"] if isinstance(m.get("answers"), str)]
    answers = [_read_jsonl(eval_dir / m["answers"]) for m in models]
    if not models or not answers[0]:
        return ""
    head = "".join(f"<th>{escape(m['name'])}</th>" for m in models)
    rows = []
    for index, first in enumerate(answers[0][:MAX_ANSWERS_SIDE_BY_SIDE]):
        cells = []
        for model_answers in answers:
            answer = model_answers[index] if index < len(model_answers) else {}
            right = _number(answer.get("score")) and answer["score"] >= 1
            cells.append(
                f"<td class={'right' if right else 'wrong'}>{escape(str(answer.get('answer', '')))}</td>"
            )
        rows.append(
            # The sample's file and line ("eval.jsonl:3"), without the folder the file sits in.
            f"<tr><td>{escape(Path(str(first.get('source', ''))).name)}</td>"
            f"<td>{escape(str(first.get('question', '')))}"
            f"</td><td>{escape(str(first.get('reference', '')))}</td>{''.join(cells)}</tr>"
        )
    shown = min(len(answers[0]), MAX_ANSWERS_SIDE_BY_SIDE)
    return (
        f"<p>answers side by side ({shown} of {len(answers[0])}; green: headline score 1):</p>"
        f"<table><tr><th>sample</th><th>question</th><th>reference</th>{head}</tr>{''.join(rows)}</table>"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _fmt(value: object) -> str:
    return f"{value:.3f}" if _number(value) else "-"


def _samples_section(run_dir: Path) -> str:
    samples = run_dir / SAMPLES_DIR
    images = sorted(samples.glob("*.png")) if samples.is_dir() else []
    html = []
    if images:
        shown = images[-MAX_SAMPLE_IMAGES:]
        if len(images) > len(shown):
            html.append(f'<p class="muted">the last {len(shown)} of {len(images)} sample grids</p>')
        html += [_figure(path, path.stem.replace("-", " ")) for path in shown]
    # `tuner infer --compare --out <run>/<folder>`: the same seeds without and with the adapter.
    html += [
        _figure(path, f"before/after ({path.parent.name}/{path.name}): base row above, adapter row below")
        for path in sorted(run_dir.glob("*/compare.png"))
    ]
    answers_file = samples / "answers.jsonl"
    if answers_file.is_file():
        html.append(_answers_table(answers_file))
    return "<h2>Samples</h2>\n" + "\n".join(html) if html else ""


def _answers_table(path: Path) -> str:
    by_step: dict[int, list[dict[str, Any]]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step.setdefault(int(record.get("step", 0)), []).append(record)
    steps = sorted(by_step)[-MAX_ANSWER_STEPS:]
    rows = "".join(
        f"<tr><td class=num>{step}</td><td>{escape(str(r.get('question', '')))}</td>"
        f"<td>{escape(str(r.get('answer', '')))}</td><td>{escape(str(r.get('reference', '')))}</td></tr>"
        for step in steps
        for r in by_step[step]
    )
    return f"<table><tr><th>step</th><th>question</th><th>answer</th><th>reference</th></tr>{rows}</table>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _data_section(run_dir: Path) -> str:
    html = []
    report = run_dir / "data_report.txt"
    if report.is_file():
        html.append(f"<pre>{escape(report.read_text(encoding='utf-8', errors='replace'))}</pre>")
    skipped = run_dir / SKIPPED_FILE
    if skipped.is_file():
        lines = skipped.read_text(encoding="utf-8", errors="replace").splitlines()
        shown = "\n".join(lines[:MAX_SKIPPED_SHOWN]) + (
            f"\n... {len(lines) - MAX_SKIPPED_SHOWN} more" if len(lines) > MAX_SKIPPED_SHOWN else ""
        )
        html.append(f"<p>{len(lines)} sample(s) skipped (skipped.jsonl):</p><pre>{escape(shown)}</pre>")
    if not html:
        html.append('<p class="muted">no data problems recorded</p>')
    return "<h2>Data</h2>\n" + "\n".join(html)


def _config(run_dir: Path) -> dict[str, Any] | None:
    import yaml

    path = run_dir / RESOLVED_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _config_section(run_dir: Path) -> str:
    path = run_dir / RESOLVED_CONFIG_NAME
    if not path.is_file():
        return ""
    config = _config(run_dir) or {}
    task = config.get("task")
    acting = keys_that_act(task) if isinstance(task, str) else None
    html = ["<h2>Config</h2>"]
    if acting:
        html.append(_acting_keys_table(config, task, acting))
    full = escape(path.read_text(encoding="utf-8", errors="replace"))
    html.append(f"<details><summary>full config (tuner_config.yaml)</summary><pre>{full}</pre></details>")
    return "\n".join(html)


_MISSING = object()


def _acting_keys_table(config: dict[str, Any], task: str, acting: list[str]) -> str:
    """The keys the task's recipe reads, by section; those this run set away from the default in bold."""
    from tuner.config.schema import RunConfig

    defaults = RunConfig().model_dump(mode="json")
    sections: dict[str, list[str]] = {}
    for key in acting:
        value = _lookup(config, key)
        if value is _MISSING:
            continue
        section, _, name = key.partition(".")
        text = f"{escape(name or section)}: {escape(json.dumps(value, default=str))}"
        changed = value != _lookup(defaults, key)
        sections.setdefault(section if name else "", []).append(f"<b>{text}</b>" if changed else text)
    rows = "".join(
        f"<tr><th>{escape(section)}</th><td>{''.join(f'<span>{item}</span>' for item in items)}</td></tr>"
        for section, items in sections.items()
    )
    return (
        f"<p>The keys {escape(task)} reads (it refuses the others unless they keep their defaults); "
        f"<b>bold</b>: set by this run's preset, config, flags or --set.</p><table class=keys>{rows}</table>"
    )


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree
