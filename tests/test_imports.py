"""Import direction: hierarchy is numpy only (checked in a fresh interpreter)."""

import subprocess
import sys


def loaded_modules(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_hierarchy_loads_neither_torch_nor_onnxruntime():
    mods = loaded_modules("import hierarchy; hierarchy.load_taxonomy('cifar100')")
    assert "torch" not in mods and "onnxruntime" not in mods and "nltk" not in mods
