"""Models in and out: loading (HF folders, presets, GGUF), the shipped edit's file format, export and Hub push."""
