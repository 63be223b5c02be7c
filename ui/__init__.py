"""The Gradio UI of Transformer Surgery, one module per tab; ``app.py`` composes them into the page.

``common`` (user errors, input parsing, shared formatting), ``callbacks`` (:class:`~ui.callbacks.SurgeryApp`, the
event functions: one call into the ``surgery`` library each), ``picker`` (the model picker and what switching
models updates), and the tab builders with their Markdown: ``diagnose``, ``heads``, ``surgery``, ``verify``.
The library never imports this package: ``surgery/`` stays free of gradio.
"""
