"""The web UI for trying adapters side by side (``python inference.py``; DESIGN.md section 12).

    workspace.py   the base model loaded once with every adapter, and answers streamed per adapter
                   (no Gradio: usable and tested on its own)
    page.py        the Gradio page: instruction, settings, one answer panel per chosen adapter,
                   the MixLoRA routing view
    server.py      the command line: arguments, start-up checks (one line, exit 2), serving

Gradio is an optional extra (``pip install -e .[web]``); nothing else in mlora imports it.
"""
