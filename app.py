"""Gradio app (stub until the Space issue lands): python app.py."""

import gradio as gr


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="Transformer Surgery") as demo:
        gr.Markdown("# Transformer Surgery\nThe app is being built; use `python -m surgery diagnose` meanwhile.")
    return demo


if __name__ == "__main__":
    build_demo().launch()
