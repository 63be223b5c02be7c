"""What the app needs from the library (model registry, sessions): no gradio here."""
