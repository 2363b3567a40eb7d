"""The Gradio page: one instruction, every chosen adapter's answer side by side, streamed.

Controls (README "Web UI"): an instruction and an optional input; "Answer with" picks the adapters
(and ``base``, the bare base model) that answer; max new tokens, temperature (0 = greedy),
top-p and seed; Generate and Stop. Each chosen adapter has one answer panel, filled as its tokens
arrive; every chosen adapter answers in the same batched generation. A MixLoRA panel adds its
routing view (`routing_html`): for each generated token, the experts each MixLoRA layer chose.

Problems (an empty instruction, nothing chosen, a failed generation) are shown in the status line
under the controls, never as a traceback. `routing_html` needs no Gradio; `build_page` imports it.
"""

from __future__ import annotations

import html
import logging
import time

from mlora.errors import MloraError
from mlora.model.generation import GenerationSettings
from mlora.web.workspace import BASE, Panel, Workspace

logger = logging.getLogger("mlora.web")

# The routing view is sent again every this many tokens (and when an answer ends): a long
# answer's table grows with every token, the text alone is cheap to send at every step.
ROUTING_EVERY = 8

CSS = """
.mlora-routing { overflow-x: auto; font-size: 12px; }
.mlora-routing table { border-collapse: collapse; margin: 4px 0 10px 0; }
.mlora-routing th, .mlora-routing td { border: 1px solid #ddd; padding: 1px 4px; text-align: center;
  white-space: nowrap; font-family: ui-monospace, monospace; }
.mlora-routing th.token { max-width: 5em; overflow: hidden; text-overflow: ellipsis; font-weight: normal; }
.mlora-routing p { margin: 2px 0; }
"""


# ------------------------------------------------------------------------------- routing view
def _token_label(text: str) -> str:
    """A token's text for a column header: whitespace made visible."""
    return text.replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def _cell_colour(expert: int, weight: float, num_experts: int) -> str:
    """One hue per expert; stronger for a more probable top expert."""
    hue = round(360 * expert / max(num_experts, 1))
    return f"hsla({hue}, 70%, 50%, {0.15 + 0.6 * weight:.2f})"


def routing_html(panel: Panel) -> str:
    """The routing view of a MixLoRA answer: two small heat maps, as HTML.

    The first table has one row per MixLoRA layer and one column per generated token; a cell
    lists the experts chosen at the position that predicted that token, most probable first
    (``data-experts="2,0"``), coloured by its top expert (stronger = more probable). The second
    table gives, per layer and expert, the share of the answer's tokens routed to that expert.
    """
    if not panel.routing:
        return '<div class="mlora-routing"><p>No tokens yet.</p></div>'
    layers = panel.routing[0].layers
    num_experts = panel.routing[0].probs.shape[1]
    name = html.escape(panel.name)
    head = "".join(f'<th class="token" title="{html.escape(t)}">{html.escape(_token_label(t))}</th>'
                   for t in panel.tokens[:len(panel.routing)])
    picked = [step.experts() for step in panel.routing]           # token -> layer -> experts
    probs = [step.probs.tolist() for step in panel.routing]        # token -> layer -> E floats
    rows = []
    for j, layer in enumerate(layers):
        cells = []
        for t in range(len(panel.routing)):
            experts = picked[t][j]
            top = experts[0] if experts else 0
            title = ", ".join(f"e{e} {probs[t][j][e]:.2f}" for e in experts)
            cells.append(f'<td data-experts="{",".join(map(str, experts))}" title="{title}" '
                         f'style="background:{_cell_colour(top, probs[t][j][top], num_experts)}">'
                         f'{",".join(map(str, experts))}</td>')
        rows.append(f'<tr data-layer="{layer}"><th>L{layer}</th>{"".join(cells)}</tr>')
    load_rows = []
    for j, layer in enumerate(layers):
        shares = [sum(e in picked[t][j] for t in range(len(picked))) / len(picked) for e in range(num_experts)]
        cells = "".join(f'<td style="background:rgba(220, 80, 30, {0.8 * s:.2f})">{round(100 * s)}</td>'
                        for s in shares)
        load_rows.append(f"<tr><th>L{layer}</th>{cells}</tr>")
    expert_head = "".join(f"<th>e{e}</th>" for e in range(num_experts))
    return (f'<div class="mlora-routing" data-adapter="{name}">'
            f"<p><b>Routing of {name}</b>: experts chosen per layer (rows) for each generated token (columns), "
            "most probable first; colour = top expert, stronger = more probable.</p>"
            f'<table class="mlora-route-tokens"><tr><th>layer</th>{head}</tr>{"".join(rows)}</table>'
            "<p>Share of the answer's tokens routed to each expert (%):</p>"
            f'<table class="mlora-route-load"><tr><th>layer</th>{expert_head}</tr>{"".join(load_rows)}</table></div>')


# ------------------------------------------------------------------------------- the page
def _message(err: BaseException) -> str:
    from mlora.errors import one_line

    text = one_line(err)
    return f"\u26a0\ufe0f {text[:1].upper()}{text[1:]}"


def build_page(workspace: Workspace):
    """The Gradio Blocks page serving `workspace` (launch it with `mlora.web.server.serve`)."""
    import gradio as gr

    choices = workspace.choices
    kinds = {BASE: "base model"} | {name: a.kind for name, a in workspace.adapters.items()}
    moe = [name for name in choices if name != BASE and workspace.adapters[name].is_moe]
    adapters = ", ".join(f"`{name}` ({kinds[name]})" for name in workspace.adapters)
    with gr.Blocks(title="mlora: adapters side by side", analytics_enabled=False) as page:
        gr.Markdown(f"## mlora: adapters side by side\nBase model `{workspace.base_model}`, adapters {adapters}. "
                    "Every chosen adapter answers the same prompt in one batched generation.")
        with gr.Row():
            with gr.Column(scale=3):
                instruction = gr.Textbox(label="Instruction", lines=3, elem_id="instruction",
                                         placeholder="What should the adapters do?")
                extra = gr.Textbox(label="Input (optional)", lines=2, elem_id="input",
                                   placeholder="Context for the instruction; leave empty for none")
                picked = gr.CheckboxGroup(choices=[(f"{n} ({kinds[n]})", n) for n in choices], value=choices,
                                          label="Answer with", elem_id="choices")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column(scale=2):
                max_new = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="max-new-tokens")
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (with temperature > 0)", elem_id="top-p")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed (with temperature > 0)", elem_id="seed")
        status = gr.Markdown(elem_id="status")
        columns, boxes, views = [], {}, {}
        with gr.Row(equal_height=False):
            for i, name in enumerate(choices):
                with gr.Column(min_width=260, elem_id=f"panel-{i}") as column:
                    boxes[name] = gr.Textbox(label=f"{name} ({kinds[name]})", lines=8, max_lines=30,
                                             interactive=False, elem_id=f"answer-{i}")
                    if name in moe:
                        with gr.Accordion("Routing", open=True):
                            views[name] = gr.HTML(elem_id=f"routing-{i}")
                columns.append(column)

        def show(chosen):
            return [gr.update(visible=name in (chosen or [])) for name in choices]

        def answer(text, context, chosen, tokens, temp, nucleus, seed_value):
            chosen = [name for name in choices if name in (chosen or [])]
            started = time.perf_counter()
            yield {status: "Generating\u2026"}
            try:
                settings = GenerationSettings(max_new_tokens=int(tokens), temperature=float(temp),
                                              top_p=float(nucleus), seed=int(seed_value or 0))
                panels = []
                for panels in workspace.answer(text, context, chosen, settings):
                    update = {status: f"Generating\u2026 {sum(len(p.tokens) for p in panels)} tokens"}
                    for panel in panels:
                        update[boxes[panel.name]] = panel.text
                        if panel.name in views and (panel.finished or len(panel.routing) % ROUTING_EVERY == 1):
                            update[views[panel.name]] = routing_html(panel)
                    yield update
            except MloraError as err:
                yield {status: _message(err)}
                return
            except Exception as err:  # a bug: the log gets the traceback, the page one line
                logger.exception("generation failed")
                yield {status: _message(err) + " (a bug: the server's log has the details)"}
                return
            total = sum(len(p.tokens) for p in panels)
            seconds = time.perf_counter() - started
            yield {status: f"Done: {total} tokens from {len(panels)} answer(s) in {seconds:.1f} s "
                           f"({total / max(seconds, 1e-9):.1f} tokens/s, one batch)."}

        def clear(chosen):
            """Empty the chosen panels before a new answer streams in."""
            return {**{boxes[n]: "" for n in choices if n in (chosen or [])},
                    **{views[n]: "" for n in moe if n in (chosen or [])}}

        outputs = [status, *boxes.values(), *views.values()]
        picked.change(show, picked, columns, queue=False)
        event = go.click(clear, picked, list(boxes.values()) + list(views.values()), queue=False).then(
            answer, [instruction, extra, picked, max_new, temperature, top_p, seed], outputs)
        stop.click(None, None, None, cancels=[event])
    return page
