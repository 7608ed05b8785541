"""Gradio UI: the Annotate tab and the Admin tab. Wiring only; logic lives in the packages."""
