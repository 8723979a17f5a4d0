"""Fault injection walk: every fault of issue 17 (and the README's fault table) tried on real processes.

python tools/chaos.py [--only SUBSTRING] [--list] [--keep]

Each case runs the real entry points (pipeline/run.py, tools/compact.py, tools/evaluate.py,
tools/plan.py) as a user would, on the bundled demo model (CPU, one process), injects the fault
(a signal, a truncated or replaced file, a held lock, bad input) and checks the exit status, the
message and what is left on disk. It prints one line per case and exits 1 if any case fails.
Takes about 20 minutes on 2 shared CPU cores; --only runs the cases whose name contains SUBSTRING.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "pipeline" / "demo"
PY = sys.executable


class Chaos:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model = tmp / "model"
        shutil.copytree(DEMO / "model", self.model)
        self.data = tmp / "train.txt"
        shutil.copyfile(DEMO / "text" / "train.txt", self.data)
        self.env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "HF_HUB_OFFLINE": "1",
            "XDG_CACHE_HOME": str(tmp / "cache"),  # tokenization cache of this walk only
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR",
                str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"),
            ),
        }
        self.env.pop("PIPELINE_FAULTS", None)
        self._finished: Path | None = None

    # -- helpers
    def config(self, name: str, out: Path | None = None, **sections: dict) -> Path:
        import yaml

        cfg = {
            "model": {"path": str(self.model), "quantization": "nf4", "dtype": "fp32"},
            "lora": {"r": 4, "alpha": 8},
            "data": {"train": str(self.data), "eval": str(DEMO / "text" / "valid.txt"), "seq_len": 32},
            "train": {"steps": 4, "micro_batch_size": 2, "lr": 0.01, "save_every": 1},
            "pruning": {"target_sparsity": 0.3, "prune_every": 2, "warmup": 0.2, "cooldown": 0.2},
            "deepspeed": {"config": str(ROOT / "ds_configs" / "zero3_cpu.json")},
            "output": {"dir": str(out or self.tmp / name)},
        }
        cfg["data"]["eval_max_tokens"] = 512
        for k, v in sections.items():
            cfg.setdefault(k, {}).update(v)
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def run(self, *args: str, faults: str = "", tool: str = "pipeline/run.py") -> subprocess.CompletedProcess:
        env = {**self.env, **({"PIPELINE_FAULTS": faults} if faults else {})}
        cmd = [PY, str(ROOT / tool), *args]
        return subprocess.run(cmd, cwd=self.tmp, env=env, capture_output=True, text=True, timeout=900)

    def train(self, cfg: Path, *overrides: str, faults: str = "") -> subprocess.CompletedProcess:
        return self.run("--config", str(cfg), *overrides, faults=faults)

    def finished(self) -> Path:
        """One finished run, shared by the cases that only read it."""
        if self._finished is None:
            out = self.tmp / "finished"
            expect(self.train(self.config("finished", out)), 0)
            self._finished = out
        return self._finished


def expect(proc: subprocess.CompletedProcess, code: int, *texts: str) -> str:
    out = proc.stdout + proc.stderr
    if proc.returncode != code:
        raise AssertionError(f"exit {proc.returncode}, expected {code}: ...{out[-1500:]}")
    for t in texts:
        if t not in out:
            raise AssertionError(f"no {t!r} in the output: ...{out[-1500:]}")
    if code == 2 and "Traceback" in out:
        raise AssertionError(f"a traceback with exit 2: ...{out[-1500:]}")
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def strict_json(text: str) -> object:
    def bad(c: str) -> None:
        raise AssertionError(f"bare {c} in JSON")

    return json.loads(text, parse_constant=bad)


# ------------------------------------------------------------------------------------------ cases


def c01_config_in_output_dir(c: Chaos) -> None:
    exp = c.tmp / "exp"
    exp.mkdir()
    cfg = exp / "config.yaml"
    cfg.write_text("# my notes\n" + c.config("exp", exp).read_text())
    before = cfg.read_bytes()
    expect(c.train(cfg, "pruning.target_sparsity=0.2"), 0)
    assert cfg.read_bytes() == before, "the input config was rewritten"
    assert "target_sparsity: 0.2" in (exp / "resolved_config.yaml").read_text()


def c02_empty_output_dir(c: Chaos) -> None:
    expect(c.train(c.config("empty"), "output.dir="), 2, "output.dir is empty")
    code = (
        "from pipeline.config.schema import config_from_dict as f; "
        "print(f({'model': {'path': 'm'}, 'data': {'train': 't'}, 'output': {'dir': '~/x'}}).output.dir)"
    )
    out = subprocess.run([PY, "-c", code], cwd=ROOT, env=c.env, capture_output=True, text=True).stdout
    assert out.strip() == str(Path.home() / "x"), out


def c03_failed_overwrite_keeps_the_finished_run(c: Chaos) -> None:
    out = c.tmp / "ow"
    cfg = c.config("ow", out)
    expect(c.train(cfg), 0)
    before = tree(out)
    expect(c.train(cfg, "output.overwrite=true", "train.max_bad_steps=1", faults="nan@3"), 3)
    after = {k: v for k, v in tree(out).items() if not k.startswith(".incoming/")}
    assert after == before, "the finished run changed"
    expect(c.run("--run", str(out), "--out", str(c.tmp / "ow-compact"), tool="tools/compact.py"), 0)
    # 5: two replacing runs in a row keep both earlier runs
    expect(c.train(cfg, "output.overwrite=true"), 0, "now in")
    expect(c.train(cfg, "output.overwrite=true", "train.resume=none"), 0, "now in")
    assert (out / "replaced.1" / "summary.json").is_file() and (out / "replaced.2" / "summary.json").is_file()


def c04_lock(c: Chaos) -> None:
    out = c.tmp / "locked"
    out.mkdir()
    held = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}
    (out / ".lock").write_text(json.dumps(held))
    expect(c.train(c.config("locked", out)), 2, "is in use by another run", f"process {os.getpid()}")
    (out / ".lock").write_text(json.dumps({**held, "pid": dead_pid()}))
    expect(c.train(c.config("locked", out), "train.steps=2"), 0, "no longer running", "taking the lock over")
    assert not (out / ".lock").exists()


def c04b_two_runs_at_once(c: Chaos) -> None:
    out = c.tmp / "twice"
    cfg = c.config("twice", out, train={"steps": 300, "save_every": 0})
    cmd = [PY, str(ROOT / "pipeline/run.py"), "--config", str(cfg)]
    first = subprocess.Popen(cmd, cwd=c.tmp, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    for _ in range(3000):  # until the first run is training
        if log.is_file() and log.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    second = c.train(cfg)
    first.send_signal(signal.SIGTERM)  # the first run saves and stops
    _, err = first.communicate(timeout=900)
    expect(second, 2, "is in use by another run")
    assert first.returncode == 75, (first.returncode, err[-800:])
    steps = [json.loads(r)["step"] for r in log.read_text().splitlines()]
    assert steps == sorted(set(steps)), f"repeated steps {steps}"


def c06_compact_killed(c: Chaos) -> None:
    run = c.finished()
    out = c.tmp / "killed-compact"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen(
            [
                PY,
                str(ROOT / "tools/compact.py"),
                "--run",
                str(run),
                "--out",
                str(out),
                "--verify",
                "--speed-repeats",
                "50",
                "--verify-samples",
                "8",
            ],
            cwd=c.tmp,
            env=c.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        staging = c.tmp / f".{out.name}.tmp-{p.pid}"
        for _ in range(1200):
            if staging.is_dir() and any(staging.glob("*.safetensors")):
                break
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
        if sig == signal.SIGTERM:
            assert p.returncode == 143 and "nothing was published" in err, (p.returncode, err[-800:])
            assert not staging.exists(), "SIGTERM left the staging directory"
        else:
            assert staging.exists(), "expected SIGKILL to leave its staging directory"
    assert not out.exists()
    expect(c.run("--run", str(run), "--out", str(out), tool="tools/compact.py"), 0, "a staging directory left by")
    assert not list(c.tmp.glob(f".{out.name}.tmp-*"))


def c07_compact_overwrite_only_an_export(c: Chaos) -> None:
    out = c.tmp / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    expect(
        c.run("--run", str(c.finished()), "--out", str(out), "--overwrite", tool="tools/compact.py"),
        2,
        "does not hold a model written by tools/compact.py",
    )
    assert (out / "thesis.tex").read_text() == "precious"


def c08_resume_with_changed_data(c: Chaos) -> None:
    cfg = c.config("changed", data={"train": str(c.tmp / "mydata.txt")}, train={"steps": 6})
    (c.tmp / "mydata.txt").write_text(c.data.read_text())
    expect(c.train(cfg, faults="sigterm@2"), 75, "SIGTERM: saved")
    (c.tmp / "mydata.txt").write_text(c.data.read_text()[::-1])
    expect(c.train(cfg), 2, "inputs changed", "mydata.txt: same size, different content")


def c09_compact_base_other_weights(c: Chaos) -> None:
    other = c.tmp / "other-model"
    shutil.copytree(c.model, other)
    from safetensors.torch import load_file, save_file

    w = load_file(other / "model.safetensors")
    save_file({k: v * 1.01 for k, v in w.items()}, other / "model.safetensors", metadata={"format": "pt"})
    expect(
        c.run("--run", str(c.finished()), "--out", str(c.tmp / "c9"), "--base", str(other), tool="tools/compact.py"),
        2,
        "not the base model the run was trained on",
    )


def c10_evaluate_seq_len(c: Chaos) -> None:
    text = str(DEMO / "text" / "valid.txt")
    expect(
        c.run("--model", str(c.model), "--text", text, "--seq-len", "100000", tool="tools/evaluate.py"),
        2,
        "exceeds the context",
    )


def c11_unreachable_target(c: Chaos) -> None:
    over = ("pruning.target_sparsity=0.99", "pruning.max_layer_sparsity=0.995")
    expect(c.train(c.config("reach"), *over), 2, "cannot be reached")


def c13_torn_log_line(c: Chaos) -> None:
    cfg = c.config("torn", train={"steps": 6})
    out = c.tmp / "torn"
    expect(c.train(cfg, faults="sigterm@3"), 75)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    expect(c.train(cfg), 0, "torn last line")


def c14_sigterm_at_startup(c: Chaos) -> None:
    expect(c.train(c.config("early"), faults="sigterm@0"), 75, "SIGTERM before the first training step")


def c15_sigint(c: Chaos) -> None:
    out = c.tmp / "ctrlc"
    expect(c.train(c.config("ctrlc", train={"steps": 6, "save_every": 0}), faults="sigint@2"), 75, "SIGINT: saved")
    assert (out / "checkpoints" / "step-00000003").is_dir()


def c16_stale_latest(c: Chaos) -> None:
    cfg = c.config("stale", train={"steps": 6, "keep_last": 3})
    out = c.tmp / "stale"
    expect(c.train(cfg, faults="sigterm@3"), 75)
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    expect(c.train(cfg), 0, "ignoring it", "at step 4 of 6")


def c17_strict_json(c: Chaos) -> None:
    out = c.tmp / "noeval"
    expect(c.train(c.config("noeval", out, data={"eval": ""}, train={"save_every": 0})), 0)
    s = strict_json((out / "summary.json").read_text())
    assert s["eval_ppl_before"] is None, s["eval_ppl_before"]
    for line in (out / "train_log.jsonl").read_text().splitlines():
        strict_json(line)


def c18_run_bad_input(c: Chaos) -> None:
    d = c.tmp / "bad"
    d.mkdir()
    trunc = d / "trunc"
    shutil.copytree(c.model, trunc)
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:4096])
    badconf = d / "badconf"
    shutil.copytree(c.model, badconf)
    (badconf / "config.json").write_text("{")
    (d / "list.json").write_text("[]")
    (d / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    (d / "file").write_text("x")
    (d / "rows.jsonl").write_text('{"text": "a b c"}\n' * 150 + "{oops\n")
    cases = [
        ([f"model.path={trunc}"], "model.safetensors is truncated"),
        ([f"model.path={badconf}"], "config.json is not valid JSON"),
        (["model.dtype=fp16"], "model.dtype=fp16 without a GPU"),
        ([f"deepspeed.config={d / 'list.json'}"], "the top level is a JSON list"),
        ([f"deepspeed.config={d / 'zero2.json'}"], "ZeRO-3 only"),
        ([f"output.dir={d / 'file'}"], "is a file"),
        ([f"output.dir={d / 'file' / 'run'}"], "which is a file"),
        ([f"data.cache_dir={d / 'file'}"], "is a file, not a directory"),
        (["lora.target_modules=lm_head", "distill.enabled=false"], "needs LoRA on at least one of"),
        ([f"data.train={d / 'rows.jsonl'}"], "line 151: not valid JSON"),
        (["pruning.target_sparsity=1.0"], "must be in [0, 1)"),
    ]
    cfg = c.config("bad")
    for overrides, message in cases:
        out = expect(c.train(cfg, *overrides), 2, message)
        assert "raise pruning.max_layer_sparsity" not in out
    expect(c.train(cfg, faults="sigterm@x"), 2, "is not KIND@STEP[:RANK]")
    expect(c.run("--config", str(d)), 2, "is a directory")


def c19_corrupt_cache_entry(c: Chaos) -> None:
    cfg = c.config("cache", train={"steps": 1, "save_every": 0}, data={"cache_dir": str(c.tmp / "tokcache")})
    expect(c.train(cfg), 0)
    for npz in (c.tmp / "tokcache").rglob("windows.npz"):
        npz.write_bytes(npz.read_bytes()[:64])
    expect(c.train(cfg, "output.overwrite=true"), 0, "rebuilding it")


def c20_every_checkpoint_corrupt(c: Chaos) -> None:
    cfg = c.config("allbad", train={"steps": 6})
    out = c.tmp / "allbad"
    expect(c.train(cfg, faults="sigterm@2"), 75)
    for m in (out / "checkpoints").glob("step-*/manifest.json"):
        m.unlink()
    out_text = expect(c.train(cfg), 2, "is complete")
    assert "resume it with train.resume=auto" not in out_text


def c21_bert(c: Chaos) -> None:
    code = (
        "import sys; from transformers import BertConfig, BertLMHeadModel;"
        "BertLMHeadModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,"
        " intermediate_size=64, is_decoder=True)).save_pretrained(sys.argv[1])"
    )
    subprocess.run([PY, "-c", code, str(c.tmp / "bert")], check=True, env=c.env, capture_output=True)
    out = expect(c.train(c.config("bert"), f"model.path={c.tmp / 'bert'}"), 2, "no model.layers")
    assert "modules include []" not in out


def c22_evaluate_and_compact_inputs(c: Chaos) -> None:
    text = str(DEMO / "text" / "valid.txt")
    ev = "tools/evaluate.py"
    expect(c.run("--model", str(c.tmp / "nowhere"), "--text", text, tool=ev), 2, "not a directory")
    expect(c.run("--model", str(c.finished()), "--text", text, tool=ev), 2, "a pruning run's directory")
    expect(c.run("--model", str(c.model), "--text", text, "--seq-len", "0", tool=ev), 2, "must be >= 2")
    trunc = c.tmp / "trunc-eval"
    shutil.copytree(c.model, trunc)
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:4096])
    expect(c.run("--model", str(trunc), "--text", text, tool=ev), 2, "truncated")
    expect(
        c.run("--run", str(c.finished()), "--out", str(c.tmp / "c22"), "--base", str(trunc), tool="tools/compact.py"),
        2,
        "truncated",
    )


def c23_plan_inputs(c: Chaos) -> None:
    (c.tmp / "plan-list.json").write_text("[]")
    for args, message in (
        (["--link-gbps", "0"], "link_gbps=0.0"),
        (["--ds-config", str(c.tmp / "plan-list.json")], "expected a JSON object"),
        (["--gpu-mem-gb", "-5"], "gpu_mem_gb=-5.0"),
        (["--gpu-mem-gb", "nan"], "gpu_mem_gb=nan"),
    ):
        out = expect(c.run("--model", "llama2-7b", *args, tool="tools/plan.py"), 2, message)
        assert "DOES NOT FIT" not in out


CASES: list[Callable[[Chaos], None]] = [v for k, v in sorted(globals().items()) if k[:1] == "c" and k[1:3].isdigit()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)
    cases = [f for f in CASES if args.only in f.__name__]
    if args.list:
        print("\n".join(f.__name__ for f in cases))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    c = Chaos(tmp)
    failed = 0
    for f in cases:
        t0 = time.perf_counter()
        try:
            f(c)
            verdict = "ok"
        except Exception as e:  # report every case, then the verdict
            failed += 1
            verdict = f"FAIL: {type(e).__name__}: {e}"
        print(f"{f.__name__:42s} {time.perf_counter() - t0:6.1f}s  {verdict}", flush=True)
    print(f"{len(cases) - failed} of {len(cases)} cases passed" + (f"; scratch in {tmp}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
