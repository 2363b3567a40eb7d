"""Charts of a run: accuracy per configuration with its spread over seeds, and the loss curves.

Written as PNG next to the results, through the run folder (`RunFolder.write_bytes`: never over
a file mlora did not write)::

    _mlora/<results stem>.png   accuracy per configuration, one panel per task and one for the
                                average: bar = mean over the replicas (seeds), whisker = one
                                sample standard deviation, dots = the replicas themselves
    _mlora/loss_curves.png      training loss per optimizer step from _mlora/logs/<name>.jsonl;
                                the replicas of a configuration share a colour (thin lines), with
                                their mean drawn thick

Both are drawn from files alone (the results JSON, the metrics logs), so ``launch.py plot
OUTPUT_DIR`` redraws them at any time. matplotlib is optional (the ``plot`` extra); it is used
through its object API (a `Figure` on an Agg canvas: no pyplot, no global backend, no display).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from mlora.errors import MloraError
from mlora.run_folder import BOOKKEEPING, MANIFEST, FolderError, RunFolder, open_run_folder

PLOT_EXTRA = 'pip install "mlora[plot]"'
LOSS_CHART = "loss_curves.png"
# The full results of a run: `mlora.evaluate.results.RESULTS_STEM`, repeated here because importing
# mlora.evaluate loads torch, which redrawing a chart does not need (a test keeps the two equal).
RESULTS_STEM = "eval_results"
BASE_COLOUR = "0.6"

Groups = Sequence[tuple[str, Sequence[str]]]  # (configuration label, its adapters) in drawing order


class PlotError(MloraError):
    """Charts cannot be drawn: matplotlib missing, no run folder, nothing to draw."""


def require_matplotlib() -> None:
    """Raise `PlotError` naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(f"charts need matplotlib, which is not installed; {PLOT_EXTRA} to draw them") from None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _colours(methods: Sequence[str]) -> dict[str, object]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    kinds = [m for m in dict.fromkeys(methods) if m not in ("", "base")]
    out: dict[str, object] = {m: palette[i % len(palette)] for i, m in enumerate(kinds)}
    out.update({"": BASE_COLOUR, "base": BASE_COLOUR})
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def accuracy_figure(doc: dict):
    """Accuracy per configuration from a results document (`EvalResults.to_dict`).

    One panel per task (plus the average over tasks when there are several): a horizontal bar
    per configuration at its mean accuracy in %, a whisker of one sample standard deviation over
    its replicas, a dot per replica; bars coloured by method.
    """
    configurations = doc["configurations"]
    tasks = list(dict.fromkeys(r["task"] for r in doc["results"]))
    panels = tasks + (["avg"] if len(tasks) > 1 else [])
    replica_acc = {(r["adapter"], r["task"]): r["acc"] for r in doc["results"]}
    replica_acc.update({(a["adapter"], "avg"): a["acc"] for a in doc["averages"]})
    colours = _colours([c["method"] for c in configurations])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.4 * cols + 1.6, rows * (0.32 * len(configurations) + 1.3) + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    y = list(range(len(configurations)))
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for i, c in enumerate(configurations):
            cell = c["average"] if panel == "avg" else c["tasks"].get(panel)
            if cell is None or not _finite(cell["acc_mean"]):
                continue
            std = cell["acc_std"]
            ax.barh(i, 100 * cell["acc_mean"], color=colours[c["method"]], alpha=0.75,
                    xerr=100 * std if _finite(std) else None, capsize=3, error_kw={"elinewidth": 1})
            dots = [replica_acc.get((a, panel)) for a in c["adapters"]]
            dots = [100 * d for d in dots if _finite(d)]
            if len(dots) > 1:
                ax.plot(dots, [i] * len(dots), "o", color="black", markersize=3, alpha=0.7)
        ax.set_title("average over tasks" if panel == "avg" else panel, fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    axes[0][0].set_yticks(y, [f"{c['configuration']} (n={c['n']})" for c in configurations])
    axes[0][0].invert_yaxis()
    model = f" - {doc['model']}" if doc.get("model") else ""
    fig.suptitle(f"accuracy per configuration{model}\nbar: mean over seeds, whisker: ±1 sample std, "
                 "dots: replicas", fontsize=10)  # fmt: skip
    return fig


def read_loss_curves(logs: Path, names: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """``name -> [(optimizer step, loss), ...]`` from the metrics logs in `logs` (event lines and
    non-finite losses left out); adapters without a log, or an empty one, are left out."""
    curves = {}
    for name in names:
        path = Path(logs) / f"{name}.jsonl"
        if not path.is_file():
            continue
        points = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if "event" not in record and _finite(record.get("loss")):
                points.append((int(record["step"]), float(record["loss"])))
        if points:
            curves[name] = points
    return curves


def loss_figure(curves: dict[str, list[tuple[int, float]]], groups: Groups):
    """Training loss per optimizer step: one colour per configuration, a thin line per replica and,
    for several replicas, their mean (over the steps every replica reached) drawn thick."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"].colors
    fig = _figure(8.5, 4.8)
    ax = fig.subplots()
    for i, (label, members) in enumerate(groups):
        lines = [curves[a] for a in members if a in curves]
        if not lines:
            continue
        colour = palette[i % len(palette)]
        for line in lines:
            steps, losses = zip(*line)
            ax.plot(steps, losses, color=colour, linewidth=0.8 if len(lines) > 1 else 1.4,
                    alpha=0.35 if len(lines) > 1 else 0.9, label=None if len(lines) > 1 else label)
        if len(lines) > 1:
            common = sorted(set.intersection(*({s for s, _ in line} for line in lines)))
            by_step = [dict(line) for line in lines]
            ax.plot(common, [sum(d[s] for d in by_step) / len(by_step) for s in common], color=colour,
                    linewidth=2.0, label=f"{label} (mean of {len(lines)})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.set_title("training loss per adapter; thin: replicas, thick: their mean", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def groups_of(doc: dict | None, names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The configurations of a results document over `names` (adapters it does not group are
    configurations of their own), in the document's order, then the others."""
    out, seen = [], set()
    for c in (doc or {}).get("configurations", []):
        members = [a for a in c["adapters"] if a in names]
        if members:
            out.append((c["configuration"], members))
            seen.update(members)
    return out + [(name, [name]) for name in names if name not in seen]


def draw_charts(folder: RunFolder, *, results: dict | None, stem: str = RESULTS_STEM,
                adapters: Sequence[str] = (), groups: Groups | None = None) -> list[Path]:
    """Draw the accuracy chart of `results` (`EvalResults.to_dict`; skipped when None) as
    ``<stem>.png`` and the loss curves of `adapters` that have a metrics log as ``loss_curves.png``,
    both in the run's bookkeeping folder. `groups` colours replicas alike in the loss chart
    (default: the configurations of `results`). Returns the paths written.

    Raises:
        PlotError: matplotlib is not installed.
        FolderError: a chart's path holds a file mlora did not write.
    """
    require_matplotlib()
    written = []
    if results is not None and results.get("results"):
        written.append(folder.write_bytes(folder.meta / f"{stem}.png", _png(accuracy_figure(results))))
    curves = read_loss_curves(folder.logs, adapters)
    if curves:
        groups = groups if groups is not None else groups_of(results, list(curves))
        written.append(folder.write_bytes(folder.meta / LOSS_CHART, _png(loss_figure(curves, groups))))
    return written


def draw_charts_or_say_why(folder: RunFolder, echo: Callable[[str], object] = print, **kwargs) -> list[Path]:
    """`draw_charts` at the end of a command that has already done its work: a chart that
    cannot be drawn (no matplotlib, a file of the user's in the way) is one line, not a failure."""
    try:
        written = draw_charts(folder, **kwargs)
    except (PlotError, FolderError) as err:
        echo(f"charts skipped: {err}")
        return []
    if written:
        echo(f"charts: {', '.join(map(str, written))}")
    return written


def redraw(output_dir, stem: str = RESULTS_STEM) -> list[Path]:
    """`launch.py plot OUTPUT_DIR`: redraw the charts of a run folder from its results
    (``_mlora/<stem>.json``) and its metrics logs (``_mlora/logs/*.jsonl``).

    Raises:
        PlotError: no matplotlib, no run folder there, or neither results nor logs to draw.
        FolderError: the folder is in use by another command, or a chart's path is not mlora's.
    """
    require_matplotlib()
    root = Path(output_dir)
    if not (root / BOOKKEEPING / MANIFEST).is_file():
        raise PlotError(f"{root} is not an mlora output folder (no {BOOKKEEPING}/{MANIFEST}); give the --output_dir "
                        "of a run")
    with open_run_folder(root) as folder:
        path = folder.meta / f"{stem}.json"
        doc = None
        if path.is_file():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise PlotError(f"{path} is not a results file mlora can read ({err}); rerun `launch.py evaluate`") from None
            if "configurations" not in doc:
                raise PlotError(f"{path} was written by an older mlora (no configurations); rerun `launch.py "
                                "evaluate` to rewrite it")
        elif stem != RESULTS_STEM:
            raise PlotError(f"no results {path}; the results of this folder: "
                            f"{', '.join(p.stem for p in sorted(folder.meta.glob('eval_results*.json'))) or 'none'}")
        scored = [r["adapter"] for r in doc["results"]] if doc else []
        logged = sorted(p.stem for p in folder.logs.glob("*.jsonl")) if folder.logs.is_dir() else []
        names = list(dict.fromkeys(scored + logged))
        if doc is None and not logged:
            raise PlotError(f"nothing to plot in {root}: no {stem}.json and no metrics logs in {folder.logs}")
        return draw_charts(folder, results=doc, stem=stem, adapters=names)
