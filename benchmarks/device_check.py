"""`make device-check`: the device path on 64-bit ARM Linux (Raspberry Pi 4/5, Jetson), run on
this x86-64 machine in an emulated arm64 Debian 12 userland.

What it does, as root on Debian/Ubuntu:

1. installs Debian's qemu-user-static, binfmt-support and mmdebstrap when missing and
   enables the arm64 binfmt handler (needs binfmt_misc: where the kernel or container
   refuses it, the check says so and exits 0 without checking anything);
2. builds (once, cached under --cache) an arm64 Debian 12 userland with python3, venv and pip;
3. builds this repository's wheel and installs it inside with only the `edge` extra and
   the onnxruntime release under test (--onnxruntime; default: what pip picks for the
   `edge` extra on aarch64, which the extra's bound decides);
4. runs `hmoe-edge verify`, `hmoe-edge predict` on Fashion-MNIST test images (each answer
   compared with this machine's x86-64 answer for the same image), and `hmoe-edge serve`
   with real requests over loopback from this machine; measures the installed runtime's
   disk use and the serving process's resident memory;
5. with --train, installs the `device` extra (torch's aarch64 wheel) in a second venv and
   runs one `hmoe-edge train` round under a memory cap;
6. with --matrix V [V ...], the boundary search: for each onnxruntime release, and each
   emulated CPU in --cpus, whether creating an InferenceSession on the flat model works or
   crashes (the issue's segmentation fault).

Results go to --out (device_check.json, device_check.md). Memory read under qemu-user is
the emulator's process: it includes qemu's own code and translation cache, so it is an upper
bound on what a real board's process holds.

    sudo make device-check                      # or: python benchmarks/device_check.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
ROOT_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
APT_TOOLS = ["qemu-user-static", "binfmt-support", "mmdebstrap"]
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8", "PIP_CERT": "/etc/ssl/certs/host-ca.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
              "PIP_DEFAULT_TIMEOUT": "180", "PYTHONDONTWRITEBYTECODE": "1"}


class Skip(Exception):
    """The check cannot run on this machine; not a failure of the project."""


def log(msg: str) -> None:
    print(f"[device-check] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------- the host
def ensure_host() -> None:
    if platform.system() != "Linux":
        raise Skip(f"needs Linux (binfmt_misc and qemu-user); this is {platform.system()}")
    if platform.machine() == "aarch64":
        raise Skip("this machine is itself aarch64: install with pip install 'hmoe-edge[edge]' and run the "
                   "commands directly; no emulation is needed")
    if os.geteuid() != 0:
        raise Skip("needs root (mmdebstrap, chroot, binfmt_misc); run `sudo make device-check`")
    missing = [t for t, exe in (("qemu-user-static", "qemu-aarch64-static"), ("mmdebstrap", "mmdebstrap"),
                                ("binfmt-support", "update-binfmts")) if shutil.which(exe) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise Skip(f"missing {', '.join(missing)} and no apt-get to install them")
        log(f"installing Debian packages {' '.join(APT_TOOLS)}")
        r = run(["apt-get", "install", "-y", "-qq", *APT_TOOLS], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode != 0:
            r = run(["sh", "-c", "apt-get update -qq && apt-get install -y -qq " + " ".join(APT_TOOLS)],
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode != 0:
            raise Skip(f"could not install {' '.join(APT_TOOLS)}: {r.stderr.strip()[-500:]}")
    handler = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not handler.exists():
        if not Path("/proc/sys/fs/binfmt_misc/register").exists():
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"])
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not handler.exists() or "enabled" not in handler.read_text():
        raise Skip("the arm64 binfmt handler cannot be enabled here (binfmt_misc is not available to this "
                   "container or kernel); run the check on a machine or VM where `update-binfmts --enable "
                   "qemu-aarch64` works")


def qemu_version() -> str:
    r = run(["qemu-aarch64-static", "--version"])
    return r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else "unknown"


# ----------------------------------------------------------------- the userland
class Userland:
    """The cached arm64 Debian userland, with /proc, /dev and /sys mounted while in use."""

    def __init__(self, cache: Path, qemu_cpu: str | None = None, host_sys: bool = False) -> None:
        self.root = cache / f"arm64-{SUITE}"
        self.qemu_cpu = qemu_cpu
        self.host_sys = host_sys
        self.mounted: list[Path] = []

    def build(self) -> None:
        if (self.root / "usr/bin/python3").exists():
            return
        tmp = self.root.with_name(self.root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log(f"building the arm64 Debian {SUITE} userland in {self.root} (once; a few minutes)")
        t = time.perf_counter()
        r = run(["mmdebstrap", "--arch=arm64", "--variant=minbase", f"--include={ROOT_PACKAGES}", SUITE, str(tmp)])
        if r.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed:\n{r.stderr[-2000:]}")
        tmp.rename(self.root)
        log(f"userland built in {time.perf_counter() - t:.0f} s")

    def __enter__(self) -> "Userland":
        for host in ("/etc/ssl/certs/ca-certificates.crt", "/etc/resolv.conf"):
            if Path(host).is_file():
                dst = self.root / ("etc/ssl/certs/host-ca.crt" if host.endswith(".crt") else "etc/resolv.conf")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(host, dst)
        self.mount_sys(self.host_sys)
        for what, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"])):
            target = self.root / what
            if run(["mountpoint", "-q", str(target)]).returncode != 0:
                r = run(["mount", *args, str(target)])
                if r.returncode != 0:
                    raise RuntimeError(f"mount {what} in the userland failed: {r.stderr.strip()}")
                self.mounted.append(target)
        return self

    def mount_sys(self, on: bool) -> None:
        """Whether the host's /sys is visible inside. Off by default: under qemu-user it shows the
        x86-64 host's CPUs beside qemu's arm64 /proc/cpuinfo, a machine no board is, and
        onnxruntime 1.28+ crashes in cpuinfo_initialize on it (docs/DEVICE.md, "Boards")."""
        target = self.root / "sys"
        is_mounted = run(["mountpoint", "-q", str(target)]).returncode == 0
        if on and not is_mounted:
            r = run(["mount", "-t", "sysfs", "sys", str(target)])
            if r.returncode != 0:
                raise RuntimeError(f"mount sys in the userland failed: {r.stderr.strip()}")
        elif not on and is_mounted:
            run(["umount", "-l", str(target)])
        self.host_sys = on

    def __exit__(self, *exc) -> None:
        self.mount_sys(False)
        for target in reversed(self.mounted):
            run(["umount", "-l", str(target)])
        self.mounted.clear()

    def env(self, extra: dict | None = None) -> list[str]:
        env = {**CHROOT_ENV, **({"QEMU_CPU": self.qemu_cpu} if self.qemu_cpu else {}), **(extra or {})}
        return ["chroot", str(self.root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())]

    def run(self, cmd: list[str], timeout: float = 1800, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return run(self.env(extra_env) + cmd, timeout=timeout)

    def popen(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(self.env() + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def venv(self, name: str, packages: list[str], timeout: float = 3600) -> tuple[str, float]:
        """A venv inside, with ``packages`` pip-installed (kept between checks when they match)."""
        venv = f"/opt/hmoe/{name}"
        stamp = self.path(venv) / ".installed"
        want = json.dumps(packages)
        if stamp.is_file() and stamp.read_text() == want:
            return venv, 0.0
        shutil.rmtree(self.path(venv), ignore_errors=True)
        t = time.perf_counter()
        r = self.run(["python3", "-m", "venv", venv])
        if r.returncode != 0:
            raise RuntimeError(f"venv failed inside the userland: {r.stderr[-1500:]}")
        r = self.run([f"{venv}/bin/pip", "install", "-q", *packages], timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(packages)} failed inside the userland:\n{r.stderr[-2500:]}")
        stamp.write_text(want)
        return venv, time.perf_counter() - t


# ----------------------------------------------------------------- what is checked
def build_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("hmoe_edge-*.whl"):
        old.unlink()
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)])
    if r.returncode != 0:
        raise RuntimeError(f"building the wheel failed:\n{r.stderr[-2000:]}")
    return next(out.glob("hmoe_edge-*.whl"))


NEAR_TIE = 1e-4   # a decision whose top-two probabilities differ by less may flip between CPUs' float paths


def path_margin(engine, x) -> float:
    """The smallest top-two probability gap among the experts on x's greedy path here."""
    import numpy as np

    from edge_runtime.engine import softmax
    gaps = []
    for node in engine.predict(x)[0].path:
        if node in engine.bundle.experts:
            p = np.sort(softmax(engine.run(node, x))[0])
            gaps.append(float(p[-1] - p[-2]))
    return min(gaps, default=1.0)


def test_images(bundle: Path, n: int) -> list[tuple[str, bytes, str, float]]:
    """(name, PNG bytes, this machine's greedy leaf, its smallest decision margin) for the
    first n test images of the bundle's data set."""
    import io

    from PIL import Image

    from edge_runtime.engine import Engine
    from edge_runtime.images import decode_image
    from trainer.datasets import load_dataset
    engine = Engine(bundle)
    data = load_dataset(engine.bundle.manifest.source.get("dataset", "fashion-mnist"))
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(data.test_x[i, 0]).save(buf, "PNG")
        png = buf.getvalue()
        x = decode_image(png, engine.bundle.input_spec)[None]
        out.append((f"test{i:03d}.png", png, engine.predict(x)[0].leaf, path_margin(engine, x)))
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_edge(ul: Userland, wheel: Path, bundle: Path, images: list, ort: str | None, result: dict) -> bool:
    spec = f"/opt/hmoe/{wheel.name}[edge]"
    packages = [spec] + ([f"onnxruntime=={ort}"] if ort else [])
    name = f"venv-edge-ort{ort or '-default'}"
    shutil.copyfile(wheel, ul.path(f"/opt/hmoe/{wheel.name}"))
    log(f"installing {' '.join(p.replace('/opt/hmoe/', '') for p in packages)} inside the arm64 userland")
    venv, seconds = ul.venv(name, packages)
    ver = ul.run([f"{venv}/bin/python", "-c", "import onnxruntime, platform, sys; print(onnxruntime.__version__, "
                  "platform.machine(), sys.version.split()[0])"])
    if ver.returncode != 0:
        raise RuntimeError(f"onnxruntime does not import inside the userland: {ver.stderr[-800:]}")
    ort_version, machine, python = ver.stdout.split()
    edge = {"onnxruntime": ort_version, "machine": machine, "python": python, "venv": name,
            "install_seconds": round(seconds, 1),
            "venv_bytes": du(ul.path(venv)), "bundle_bytes": du(bundle)}
    result["edge"] = edge
    log(f"inside: {machine}, Python {python}, onnxruntime {ort_version}")
    target = ul.path("/opt/hmoe/bundle")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target)
    img_dir = ul.path("/opt/hmoe/images")
    shutil.rmtree(img_dir, ignore_errors=True)
    img_dir.mkdir(parents=True)
    for name_, png, _, _ in images:
        (img_dir / name_).write_bytes(png)
    exe = f"{venv}/bin/hmoe-edge"
    r = ul.run([exe, "verify", "/opt/hmoe/bundle"], timeout=600)
    edge["verify"] = {"rc": r.returncode, "out": (r.stdout + r.stderr).strip()[-300:]}
    log(f"verify: rc {r.returncode}")
    t = time.perf_counter()
    r = ul.run([exe, "predict", "--bundle", "/opt/hmoe/bundle", "--json",
                *(f"/opt/hmoe/images/{n}" for n, _, _, _ in images)], timeout=900)
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    got = {Path(a["image"]).name: a["leaf"] for a in answers}
    same = sum(got.get(n) == leaf for n, _, leaf, _ in images)
    ties = sum(got.get(n) != leaf and margin < NEAR_TIE for n, _, leaf, margin in images)
    edge["predict"] = {"rc": r.returncode, "images": len(images), "same_leaf_as_x86": same,
                       "differing_near_ties": ties,
                       "seconds": round(time.perf_counter() - t, 1),
                       "stderr": r.stderr.strip()[-500:] if r.returncode else ""}
    log(f"predict: rc {r.returncode}, {same}/{len(images)} answers equal x86-64's")
    serve = serve_and_ask(ul.popen, [exe, "serve", "--bundle", "/opt/hmoe/bundle"], images)
    log(f"serve: {serve.get('same_leaf_as_x86', 0)}/10 answers over loopback equal x86-64's; resident "
        f"{serve.get('rss_mb_after') or float('nan'):.0f} MB (qemu's process: an upper bound)")
    # the same server natively on this machine, and an idle Python under qemu, for scale
    native = serve_and_ask(lambda cmd: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        start_new_session=True),
                           [str(Path(sys.executable).with_name("hmoe-edge")), "serve", "--bundle", str(bundle)], images)
    idle = ul.popen(["python3", "-c", "import time; time.sleep(8)"])
    time.sleep(5)
    edge["idle_python_rss_mb_under_qemu"] = rss_mb(idle.pid)
    idle.wait(30)
    edge["native_x86_serve"] = {k: native.get(k) for k in ("rss_mb_ready", "rss_mb_after", "same_leaf_as_x86")}
    edge["serve"] = serve
    return (edge["verify"]["rc"] == 0 and edge["predict"]["rc"] == 0 and same + ties == len(images)
            and serve.get("same_leaf_as_x86", 0) + serve.get("differing_near_ties", 0) == 10)


def serve_and_ask(popen, cmd: list[str], images: list) -> dict:
    """Start ``hmoe-edge serve`` (through ``popen``), wait for /health, send 10 images over
    loopback, compare the leaves with x86-64's, read the process's resident memory, stop it."""
    import httpx
    port = free_port()
    proc = popen(cmd + ["--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    serve: dict = {"started": False}
    try:
        t = time.perf_counter()
        while time.perf_counter() - t < 300 and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    serve["started"] = True
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        serve["start_seconds"] = round(time.perf_counter() - t, 1)
        if serve["started"]:
            rss_ready = rss_mb(proc.pid)
            ok = ties = 0
            for _, png, leaf, margin in images[:10]:
                r = httpx.post(url + "/predict", content=png, headers={"content-type": "image/png"}, timeout=60)
                same = r.status_code == 200 and r.json()["leaf"] == leaf
                ok += same
                ties += r.status_code == 200 and not same and margin < NEAR_TIE
            serve.update(requests=10, same_leaf_as_x86=ok, differing_near_ties=ties, rss_mb_ready=rss_ready, rss_mb_after=rss_mb(proc.pid),
                         experts=httpx.get(url + "/experts", timeout=10).json())
        else:
            serve["rc"] = proc.poll()
            serve["stderr"] = proc.stderr.read().decode()[-800:] if proc.poll() is not None else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return serve


def check_train(ul: Userland, wheel: Path, images: list, result: dict, timeout: float, torch: str) -> bool:
    """One local training round with the device extra (torch's aarch64 wheel) under a memory cap.
    ``torch`` pins the release: on aarch64, PyPI's torch 2.9.1 is a CPU build (about 0.7 GB
    installed) while its newest releases are CUDA builds of several GB, which no board wants."""
    import io

    import numpy as np
    from PIL import Image
    log("installing the device extra (torch for aarch64) inside the userland; this takes a while")
    try:
        venv, seconds = ul.venv(f"venv-device-torch{torch or '-default'}",
                                [f"/opt/hmoe/{wheel.name}[device]", f"/opt/hmoe/{wheel.name}[edge]",
                                 *([f"torch=={torch}"] if torch else [])], timeout=timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        result["train"] = {"ok": False, "error": str(exc)[-1500:]}
        return False
    xs = np.stack([np.asarray(Image.open(io.BytesIO(png))) for _, png, _, _ in images])
    leaves = [leaf for _, _, leaf, _ in images]
    np.savez(ul.path("/opt/hmoe/train.npz"), images=xs, labels=np.array(leaves))
    t = time.perf_counter()
    try:
        r = ul.run([f"{venv}/bin/hmoe-edge", "train", "--bundle", "/opt/hmoe/bundle", "--expert", "root", "--data",
                    "/opt/hmoe/train.npz", "--memory-cap-mb", "512", "--out", "/opt/hmoe/update"], timeout=timeout)
    except subprocess.TimeoutExpired:
        result["train"] = {"ok": False, "error": f"one round did not finish within {timeout:.0f} s under emulation"}
        return False
    ver = ul.run([f"{venv}/bin/python", "-c", "import torch; print(torch.__version__)"])
    result["train"] = {"ok": r.returncode == 0, "rc": r.returncode, "venv": venv,
                       "seconds": round(time.perf_counter() - t, 1),
                       "install_seconds": round(seconds, 1), "torch": ver.stdout.strip(),
                       "venv_bytes": du(ul.path(venv)), "out": (r.stdout + r.stderr).strip()[-600:]}
    log(f"train: rc {r.returncode} in {result['train']['seconds']} s (torch {ver.stdout.strip()})")
    return r.returncode == 0


def check_boards(ul: Userland, bundle: Path, images: list, boards: list[str], predictions: int, result: dict,
                 train_venv: str | None, seconds: float) -> bool:
    """benchmarks/boards.py's profiles around the runtime inside the userland: `hmoe-edge serve`
    (and with --train one `hmoe-edge train` round) under each profile's memory limit and CPU
    quota, with ``predictions`` posted one at a time from this machine. The memory is qemu's
    process: an upper bound on what the board's holds."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import io

    import numpy as np
    from PIL import Image

    import boards as profiles
    edge = result["edge"]
    exe = [*ul.env(), f"/opt/hmoe/{edge['venv']}/bin/hmoe-edge"]
    pngs = [png for _, png, _, _ in images]
    pngs = (pngs * (predictions // len(pngs) + 1))[:predictions]
    work = ul.path("/opt/hmoe/boards")
    work.mkdir(parents=True, exist_ok=True)
    xs = np.stack([np.asarray(Image.open(io.BytesIO(png))) for _, png, _, _ in images])
    ys = np.array([leaf for _, _, leaf, _ in images])   # leaf names, as check_train's round

    def inside(path) -> str:
        return "/opt/hmoe/bundle" if Path(path) == bundle else "/" + str(Path(path).relative_to(ul.root))

    rows = []
    for board in boards:
        stages = {"serve": lambda limit: profiles.serve_stage(limit, Path("/opt/hmoe/bundle"), pngs, exe)}
        if train_venv:
            stages["train"] = lambda limit, cap: profiles.train_stage(
                limit, bundle, xs, ys, cap, work, seconds, [*ul.env(), f"{train_venv}/bin/hmoe-edge"], inside)
        try:
            row = profiles.run_board(board, bundle.name, stages)
        except profiles.LimitError as exc:
            result["boards"] = {"refused": str(exc)}
            log(f"boards: cannot create a board's limit here: {exc}")
            return True   # not a failure of the project (the check says why)
        for stage in ("serve", "train"):   # what a process said is kept when it failed
            r = row.get(stage)
            if r and not r["killed"] and r.get("returncode", 0) == 0:
                r.pop("stderr_tail", None)
        rows.append(row)
    result["boards"] = {"predictions": predictions, "rows": rows}
    return all(not r["serve"]["killed"] and r["serve"]["errors"] == 0 for r in rows)


def boundary(ul: Userland, bundle: Path, versions: list[str], cpus: list[str], result: dict) -> None:
    """Per onnxruntime release, emulated CPU, and with or without the host's /sys visible: does
    importing onnxruntime and running the flat model in a session work?"""
    shutil.copytree(bundle, ul.path("/opt/hmoe/bundle"), dirs_exist_ok=True)
    model = "/opt/hmoe/bundle/" + json.loads((bundle / "manifest.json").read_text())["flat"]["file"]
    probe = ("import onnxruntime as ort, numpy as np; s = ort.InferenceSession(%r, providers=['CPUExecutionProvider']); "
             "i = s.get_inputs()[0]; print(s.run(None, {i.name: np.zeros([1] + list(i.shape[1:]), np.float32)})[0]"
             ".shape)") % model
    rows = []
    for v in versions:
        log(f"onnxruntime {v}: installing")
        try:
            venv, _ = ul.venv(f"venv-ort-{v}", [f"onnxruntime=={v}"])
        except RuntimeError as exc:
            rows.append({"onnxruntime": v, "cpu": None, "result": "not installable", "detail": str(exc)[-300:]})
            continue
        for host_sys in (True, False):
            ul.mount_sys(host_sys)
            for cpu in cpus:
                r = ul.run([f"{venv}/bin/python", "-c", probe], timeout=900,
                           extra_env={"QEMU_CPU": cpu} if cpu != "default" else None)
                crashed = r.returncode in (-11, 139) or "signal 11" in r.stderr
                res = "ok" if r.returncode == 0 else "segmentation fault" if crashed else f"exit {r.returncode}"
                rows.append({"onnxruntime": v, "cpu": cpu, "host_sys": host_sys, "result": res, "rc": r.returncode,
                             "detail": (r.stderr.strip() or r.stdout.strip())[-300:]})
                log(f"onnxruntime {v}, QEMU_CPU {cpu}, host /sys {'visible' if host_sys else 'hidden'}: {res}")
    ul.mount_sys(False)
    result["boundary"] = rows


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Emulated arm64 Debian {SUITE} on {result['host']['machine']} ({result['qemu']}), QEMU_CPU "
             f"{result['qemu_cpu'] or 'default (max)'}, host's /sys "
             f"{'visible' if result.get('host_sys_visible') else 'not mounted'} inside.", ""]
    e = result.get("edge")
    if e:
        s = e.get("serve", {})
        lines += ["| architecture | Python | onnxruntime | verify | predict (same leaf as x86-64) | serve over loopback "
                  "| runtime + deps on disk | bundle on disk | serving RSS under qemu (idle Python under qemu) | the same "
                  "server's RSS natively on x86-64 |", "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {e['machine']} | {e['python']} | {e['onnxruntime']} | {'ok' if e['verify']['rc'] == 0 else 'FAIL'} | "
                  f"{e['predict']['same_leaf_as_x86']}/{e['predict']['images']} | "
                  f"{s.get('same_leaf_as_x86', 0)}/{s.get('requests', 10)} | {e['venv_bytes'] / 1e6:.0f} MB | "
                  f"{e['bundle_bytes'] / 1e6:.1f} MB | {s.get('rss_mb_after') or float('nan'):.0f} MB "
                  f"({e.get('idle_python_rss_mb_under_qemu') or float('nan'):.0f} MB) | "
                  f"{(e.get('native_x86_serve') or {}).get('rss_mb_after') or float('nan'):.0f} MB |", ""]
    t = result.get("train")
    if t:
        lines += [f"Local training (device extra, torch {t.get('torch', '?')}): "
                  f"{'one round of the root expert in ' + str(t['seconds']) + ' s' if t['ok'] else 'FAILED'}"
                  f"{', ' + str(round(t['venv_bytes'] / 1e6)) + ' MB installed' if t.get('venv_bytes') else ''}.", ""]
    b = result.get("boards")
    if b and b.get("refused"):
        lines += [f"Board profiles: not run here ({b['refused']}).", ""]
    elif b:
        lines += [f"**Board profiles inside the userland** (benchmarks/boards.py's limits around the emulated runtime; "
                  f"serve with {b['predictions']} predictions posted one at a time; peak RSS is qemu's process, an upper "
                  "bound; the cgroup's peak counts page cache too):", "",
                  "| board | limit MB | CPUs | serve: peak RSS MB | cgroup peak MB | p50 / p95 ms | errors | killed | "
                  "training round: peak RSS MB | exit | killed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            s, t = r["serve"], r.get("train")
            lines.append(f"| {r['board']} | {r['limit_mb']} | {r['cpus']:g} | {s['peak_rss_mb']:.0f} | "
                         f"{s['cgroup_peak_mb']:.0f} | {s['p50_ms'] or float('nan'):.1f} / "
                         f"{s['p95_ms'] or float('nan'):.1f} | {s['errors']} | {'yes' if s['killed'] else 'no'} | " +
                         (f"{t['peak_rss_mb']:.0f} | {t['returncode']} | {'yes' if t['killed'] else 'no'} |" if t
                          else "not run (--train) | | |"))
        lines.append("")
    if result.get("boundary"):
        lines += ["| onnxruntime | QEMU_CPU | host's /sys visible | import and run the flat model |", "|---|---|---|---|"]
        lines += [f"| {r['onnxruntime']} | {r['cpu']} | {'yes' if r.get('host_sys') else 'no'} | {r['result']} |"
                  for r in result["boundary"]]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.environ.get("HMOE_DEVICE_CACHE", "/var/cache/hmoe-edge"),
                   help="where the arm64 userland and its venvs are kept between checks")
    p.add_argument("--bundle", default="runs/demo/bundle", help="the bundle to check (default: the demo's)")
    p.add_argument("--out", default="runs/device-check")
    p.add_argument("--onnxruntime", default=None, help="onnxruntime release to install (default: pip's choice "
                   "for the edge extra)")
    p.add_argument("--qemu-cpu", default=None, help="emulated CPU (QEMU_CPU), e.g. cortex-a72 (Raspberry Pi 4), "
                   "cortex-a76 (Pi 5); default qemu's 'max'")
    p.add_argument("--host-sys", action="store_true", help="make the host's /sys visible inside (reproduces the "
                   "onnxruntime crash; see docs/DEVICE.md)")
    p.add_argument("--images", type=int, default=20, help="Fashion-MNIST test images to predict")
    p.add_argument("--boards", nargs="*", default=[], metavar="BOARD",
                   help="board profiles of benchmarks/boards.py to run the emulated runtime inside (its memory "
                        "limit and CPU quota; root and cgroup controllers): pi-zero-2w 1gb 2gb. make device-check "
                        "passes all three")
    p.add_argument("--board-predictions", type=int, default=200, help="with --boards: predictions posted per board")
    p.add_argument("--board-stage-seconds", type=float, default=600,
                   help="with --boards --train: stop a training round still running after this (a limit too small "
                        "thrashes rather than being killed)")
    p.add_argument("--train", action="store_true", help="also install the device extra and train one round")
    p.add_argument("--train-timeout", type=float, default=3600)
    p.add_argument("--torch", default="2.9.1", help="with --train: the torch release to install ('' for pip's "
                   "choice; on aarch64 PyPI's 2.9.1 is a CPU build, its newest are CUDA builds of several GB)")
    p.add_argument("--matrix", nargs="*", default=None, metavar="VERSION",
                   help="boundary search: onnxruntime releases to try creating a session with (no edge check)")
    p.add_argument("--cpus", nargs="+", default=["default"], help="with --matrix: QEMU_CPU values to try")
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from boards import PROFILES
    unknown = [b for b in args.boards if b not in PROFILES]
    if unknown:
        p.error(f"unknown board profile {', '.join(unknown)}; profiles are {', '.join(PROFILES)}")
    try:
        ensure_host()
    except Skip as exc:
        log(f"skipped: {exc}")
        return 0
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        log(f"no bundle at {bundle}: run `make demo` first (it writes runs/demo/bundle), or pass --bundle")
        return 2
    ul = Userland(Path(args.cache), args.qemu_cpu, args.host_sys)
    ul.build()
    result = {"host": {"machine": platform.machine(), "platform": platform.platform()}, "qemu": qemu_version(),
              "qemu_cpu": args.qemu_cpu, "host_sys_visible": args.host_sys, "suite": SUITE, "bundle": str(bundle), "command": " ".join(sys.argv)}
    ok = True
    started = time.perf_counter()
    with ul:
        ul.path("/opt/hmoe").mkdir(parents=True, exist_ok=True)
        if args.matrix is not None:
            boundary(ul, bundle, args.matrix, args.cpus, result)
        else:
            wheel = build_wheel(Path(args.out) / "wheel")
            images = test_images(bundle, args.images)
            ok = check_edge(ul, wheel, bundle, images, args.onnxruntime, result)
            if args.train:
                ok = check_train(ul, wheel, images, result, args.train_timeout, args.torch) and ok
            if args.boards and ok:
                ok = check_boards(ul, bundle, images, args.boards, args.board_predictions, result,
                                  result.get("train", {}).get("venv"), args.board_stage_seconds)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    write(Path(args.out), result)
    log("passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
