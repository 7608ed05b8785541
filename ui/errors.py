"""Refusals shown to a person as one line (a gr.Error toast). They are answers, not server faults:
no traceback goes to the log, where a flood of refused requests would otherwise cost a formatted
traceback each."""

import gradio as gr


def refused(message: str, title: str = "Error") -> gr.Error:
    return gr.Error(message, title=title, print_exception=False)
