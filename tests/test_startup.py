"""``proxyclip --help`` stays light: building the command line imports no torch, open_clip, timm or gradio."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "timm", "gradio", "huggingface_hub")


def _python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["segment"], ["eval"], ["demo"], ["bench"], ["presets"], ["prepare"]])
def test_help_imports_nothing_heavy(command):
    script = (
        "import sys\n"
        "from proxyclip.apps.cli import main\n"
        "try:\n"
        f"    main({[*command, '--help']!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    proc = _python("-c", script)
    assert proc.returncode == 0, proc.stderr
    assert "usage: proxyclip" in proc.stdout
    assert "HEAVY []" in proc.stderr, proc.stderr


def test_python_m_proxyclip_help_and_lazy_package():
    proc = _python("-m", "proxyclip", "segment", "--help")
    assert proc.returncode == 0 and "--batch-images" in proc.stdout, proc.stderr
    proc = _python("-c", "import sys, proxyclip; assert 'torch' not in sys.modules; "
                         "from proxyclip import ProxyCLIP, CLIP_MODELS; assert 'torch' in sys.modules; print(ProxyCLIP.__name__)")
    assert proc.returncode == 0 and proc.stdout.strip() == "ProxyCLIP", proc.stderr


def test_catalog_agrees_with_the_builders(monkeypatch):
    """The timm names the weight check looks for are exactly what the builders load."""
    from proxyclip.model import catalog, vfm

    assert set(catalog.VFM_TIMM_NAMES) <= set(vfm.VFM_BUILDERS)  # every timm VFM (others, e.g. SD, load otherwise)

    class Built(Exception):
        pass

    def create_model(name, **kwargs):
        raise Built(name)

    monkeypatch.setattr(vfm.timm, "create_model", create_model)
    for key in catalog.VFM_TIMM_NAMES:
        with pytest.raises(Built) as info:
            vfm.VFM_BUILDERS[key](random_weights=True)
        assert str(info.value) == catalog.VFM_TIMM_NAMES[key], key
