"""The public face: what `surgery` exports, and the README's "Python API" example run as written."""

import re
import subprocess
import sys

from conftest import ROOT

from surgery.io.edit_file import Edit


def readme_example() -> str:
    """The first ```python block after the README's "## Python API" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_surgery_is_cheap_and_exports_the_entry_points():
    code = (
        "import sys, surgery; assert 'torch' not in sys.modules; "
        "from surgery import load_model, diagnose, operate, verify; "
        "[getattr(surgery, n) for n in surgery.__all__]; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_all_lists_exactly_the_lazily_imported_names():
    import surgery

    assert sorted(surgery.__all__) == sorted(surgery._EXPORTS)


def test_readme_python_api_repairs_the_demo_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "assets").symlink_to(ROOT / "assets")  # the example's paths are relative to the repository root
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Routing failure")
    assert out[-1] == "True []"
    edit = Edit.load(tmp_path / "fix.safetensors")
    assert edit.site == "wv"
