"""The command line: parses, dispatches, and prints. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import errno
import json
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from modelcollapse.errors import BadInput, RunFailed
from modelcollapse.procs import DEFAULT_THREADS, THREADS_ENV, set_threads

# The benchmarks' names, without importing the benchmarks (numpy, torch) to print help.
BENCH_NAMES = ("linreg", "linreg-all", "gaussian", "categorical", "kde", "lm-train", "lm-sample")
THREADS_HELP = (f"torch/OpenMP threads; on the CPU, the processes a run splits its work over: a vectorised run "
                f"(linreg, gaussian, categorical, kde) its seeds, any other its (policy, seed) chains, one thread each "
                f"(default: ${THREADS_ENV}, else OMP_NUM_THREADS, else {DEFAULT_THREADS}: "
                "small models gain nothing from more threads, and lose much on shared cores)")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Model-fitting feedback loops, and whether the models collapse.")


def _version(value: bool) -> None:
    if value:
        from modelcollapse import __version__

        typer.echo(f"modelcollapse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")):
    """Model-fitting feedback loops, and whether the models collapse."""


class Backend(str, Enum):
    local = "local"
    ray = "ray"


class Track(str, Enum):
    mlflow = "mlflow"
    wandb = "wandb"
    tensorboard = "tensorboard"


TRACK_HELP = ("log each chain's metrics, config, samples and status to this tool too (its own environment variables "
              "say where: MLFLOW_TRACKING_URI, WANDB_MODE, ...; README: Tracking)")


def _track(track: Optional[Track]) -> Optional[str]:
    """The tool's name, once its package is known to import (else bad input, before anything runs)."""
    from modelcollapse import tracking

    name = track.value if track else None
    tracking.check(name)
    return name


class Scale(str, Enum):
    quick = "quick"
    cpu = "cpu"
    paper = "paper"


@app.command()
def run(
    config: Path = typer.Argument(..., metavar="CONFIG", help="experiment config (TOML); a sweep file runs with `modelcollapse sweep`"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="run directory (default: runs/<name>); resumed if present"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config key, e.g. --set linreg.T=50 (repeatable)"),
    nproc: int = typer.Option(1, "--nproc", metavar="N", min=1, help="data-parallel processes on this node (launched as torchrun does; lm only)"),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", min=1, help=THREADS_HELP),
    track: Optional[Track] = typer.Option(None, "--track", envvar="MODELCOLLAPSE_TRACK", help=TRACK_HELP),
):
    """Run one experiment: every policy, seed and iteration of CONFIG."""
    set_threads(threads)
    from modelcollapse import config as configlib
    from modelcollapse import distributed
    from modelcollapse.loop import run_experiment

    cfg = configlib.load(config, set_)
    tool = _track(track)
    out = out or Path("runs") / cfg.name
    if nproc > 1:
        distributed.check_world(cfg, nproc)  # bad input is found here, before any process starts
        args = ["run", str(config), "--out", str(out), *(a for s in set_ for a in ("--set", s)), *(["--track", tool] if tool else [])]
        raise typer.Exit(distributed.launch(nproc, configlib.resolve_device(cfg.device), args))
    try:
        run_experiment(cfg, out, track=tool)
    except BadInput:
        if distributed.is_writer():
            raise
        raise typer.Exit(2) from None  # rank 0 has the same bad input and reports it
    if distributed.is_writer():
        typer.echo(f"done: {out}")


THEORY_OPTIONS = {"linreg": ("d", "T", "sigma2"), "gaussian": ("d", "n", "sigma2", "estimator"),
                  "categorical": ("k", "n", "zipf", "smoothing", "reward")}


def _reward(value: str) -> str | list[float]:
    """--reward: head, tail, or K comma-separated numbers (the categorical table's `reward`)."""
    if value in ("head", "tail"):
        return value
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise BadInput(f"theory categorical: --reward must be head, tail or comma-separated numbers (got {value!r})") from None


@app.command()
def theory(
    family: str = typer.Argument(..., metavar="FAMILY", help="linreg, gaussian or categorical"),
    policy: str = typer.Option("accumulate", "--policy", metavar="P", help="replace, accumulate, replace-grown (linreg); any built-in policy (gaussian, categorical)"),
    real_fraction: Optional[float] = typer.Option(None, "--real-fraction", metavar="λ", help="λ of mix and fresh"),
    d: Optional[int] = typer.Option(None, "--d", metavar="D", help="dimension (linreg: 10, gaussian: its default)"),
    T: Optional[int] = typer.Option(None, "--T", metavar="T", help="linreg: training rows (default 111)"),
    n: Optional[int] = typer.Option(None, "--n", metavar="N", help="gaussian, categorical: samples per generation"),
    sigma2: Optional[float] = typer.Option(None, "--sigma2", metavar="S", help="linreg: noise variance; gaussian: Σ₀ = σ²I (default 1)"),
    estimator: Optional[str] = typer.Option(None, "--estimator", metavar="mle|unbiased", help="gaussian: mle (default) or unbiased"),
    k: Optional[int] = typer.Option(None, "--k", metavar="K", help="categorical: outcomes"),
    zipf: Optional[float] = typer.Option(None, "--zipf", metavar="S", help="categorical: Zipf exponent of the truth (0: uniform)"),
    smoothing: Optional[float] = typer.Option(None, "--smoothing", metavar="A", help="categorical: additive smoothing α (default 0)"),
    reward: Optional[str] = typer.Option(None, "--reward", metavar="R", help="categorical: the reward of each outcome: head (default), tail, or K comma-separated numbers"),
    select: Optional[str] = typer.Option(None, "--select", metavar="NAME", help="the policy's selection stage (select.name): k-choice has exact curves (categorical, on the reward)"),
    score: Optional[str] = typer.Option(None, "--score", metavar="S", help="select.score, e.g. reward"),
    select_k: Optional[int] = typer.Option(None, "--select-k", metavar="K", help="select.k: candidates per kept draw (default 4)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", metavar="T", help="select.temperature (default 1)"),
    real_weight: Optional[float] = typer.Option(None, "--real-weight", metavar="W", help="the real examples' share of the fit (gaussian: exact under mix and fresh)"),
    iterations: int = typer.Option(10, "--iterations", metavar="N", help="model-fitting iterations"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object instead of a table"),
):
    """Exact expected metrics per iteration: linreg's Theorems 1 and 2; the gaussian's and categorical's
    closed forms and chains, with a real weight or a k-choice curation where they are exact (docs/theory.md)."""
    from modelcollapse import theory as th

    if family not in THEORY_OPTIONS:
        raise BadInput(f"theory: no closed forms for family {family!r}; choose one of {', '.join(THEORY_OPTIONS)}")
    given = {key: v for key, v in dict(d=d, T=T, n=n, sigma2=sigma2, estimator=estimator, k=k, zipf=zipf, smoothing=smoothing,
                                       reward=reward).items() if v is not None}
    stray = [f"--{key}" for key in given if key not in THEORY_OPTIONS[family]]
    if stray:
        raise BadInput(f"theory {family}: {', '.join(stray)} is not an option of {family}; its options are {', '.join('--' + o for o in THEORY_OPTIONS[family])}")
    if "reward" in given:
        given["reward"] = _reward(given["reward"])
    chosen = {key: v for key, v in dict(name=select, score=score, k=select_k, temperature=temperature).items() if v is not None}
    if chosen and select is None:
        raise BadInput(f"theory {family}: --score, --select-k and --temperature set a selection stage; name it with --select")
    if family != "linreg":
        if policy in ("mix", "fresh") and real_fraction is None:
            raise BadInput(f"theory {family}: --policy {policy} needs --real-fraction λ (0 < λ < 1)")
        spec = {"name": policy} if real_fraction is None else {"name": policy, "real_fraction": real_fraction}
        spec |= ({"select": chosen} if chosen else {}) | ({"real_weight": real_weight} if real_weight is not None else {})
        config, resolved, curves = th.family_curves(family, spec, given, iterations)
        curves = {key: [float(v) for v in values] for key, values in curves.items()}
        if as_json:
            typer.echo(json.dumps({"family": family, "policy": resolved.label, "iteration": list(range(1, iterations + 1)), **curves}))
            return
        shown = " ".join(f"{key}={getattr(config, key)}" for key in THEORY_OPTIONS[family])
        typer.echo(f"# {family} {resolved.label}: {shown}")
        typer.echo("\t".join(["iteration", *curves]))
        for i in range(iterations):
            typer.echo("\t".join([str(i + 1), *(f"{curves[key][i]:.6g}" for key in curves)]))
        return
    if chosen or real_weight is not None:
        raise BadInput("theory linreg: no exact curve with a selection or a real weight (docs/theory.md)")
    d, T, sigma2 = given.get("d", 10), given.get("T", 111), given.get("sigma2", 1.0)
    errors = th.linreg_test_error(policy, d, T, sigma2, iterations)
    c = th.linreg_c(d, T, sigma2)
    if as_json:
        typer.echo(json.dumps({"family": family, "policy": policy, "d": d, "T": T, "sigma2": sigma2, "c": c,
                               "bound": th.linreg_accumulate_bound(d, T, sigma2) if policy == "accumulate" else None,
                               "iteration": list(range(1, iterations + 1)), "test_error": errors.tolist()}))
        return
    typer.echo(f"# linreg {policy}: d={d} T={T} sigma2={sigma2} c={c:.6g}")
    typer.echo("iteration\ttest_error")
    for i, e in enumerate(errors, 1):
        typer.echo(f"{i}\t{e:.6g}")
    if policy == "accumulate":
        typer.echo(f"# bound c*pi^2/6 = {th.linreg_accumulate_bound(d, T, sigma2):.6g}")


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., metavar="DIR...", help="run directories (or sweep directories)"),
    out: Path = typer.Option(..., "--out", metavar="REPORT_DIR", help="report directory: index.html, PNG figures, summary.md"),
):
    """Figures and tables from run directories, with theory overlaid where it exists."""
    from modelcollapse.report import write_report

    write_report(dirs, out)
    typer.echo(f"report: {out / 'index.html'}")


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., metavar="SWEEP_FILE", help="sweep file: a [base] config and a [grid] of overrides; a run config runs with `modelcollapse run`"),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="sweep directory; each cell is a run directory inside it"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a key of the base config (repeatable)"),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N", help="cells at once (local, default 1) or the CPUs of a local Ray instance (default all)"),
    backend: Backend = typer.Option(Backend.local, "--backend", help="local: child processes here; ray: a Ray task per cell"),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDR", help="join this Ray cluster (e.g. auto) instead of starting a local one"),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", min=1, help=THREADS_HELP + "; per cell"),
    track: Optional[Track] = typer.Option(None, "--track", envvar="MODELCOLLAPSE_TRACK", help=TRACK_HELP + "; the cells share one group"),
):
    """Run every cell of a sweep; finished cells are skipped, a failed cell does not stop the others."""
    set_threads(threads)
    from modelcollapse.sweep import run_sweep

    results = run_sweep(sweep_file, out, set_, workers=workers, backend=backend.value, address=address, track=_track(track))
    failed = [c for c, status in results if status != "done"]
    for cell in failed:
        typer.echo(f"failed: {cell.name} ({cell.status}): {cell.error}  [log: {out / cell.log}]", err=True)
    skipped = sum(c.skipped for c, _ in results)
    typer.echo(f"done: {len(results) - len(failed)}/{len(results)} cells ({skipped} already done) in {out}")
    if failed:
        raise typer.Exit(1)


@app.command()
def reproduce(
    scale: Scale = typer.Option(Scale.quick, "--scale", help="quick: minutes on a laptop; cpu: hours; paper: GPUs"),
    only: Optional[str] = typer.Option(None, "--only", metavar="FAMILY,...", help="comma-separated families, e.g. linreg,lm"),
    out: Path = typer.Option(Path("results"), "--out", metavar="DIR", help="one run directory per preset, and report/"),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", min=1, help=THREADS_HELP),
    track: Optional[Track] = typer.Option(None, "--track", envvar="MODELCOLLAPSE_TRACK", help=TRACK_HELP),
):
    """The paper end to end at a scale: every preset of configs/<scale>/, then one report."""
    set_threads(threads)
    from modelcollapse.reproduce import reproduce as reproduce_all

    report_dir = reproduce_all(scale.value, only.split(",") if only else None, out, track=_track(track))
    typer.echo(f"report: {report_dir / 'index.html'}")


@app.command()
def export(
    gen_dir: Path = typer.Argument(..., metavar="GEN_DIR", help="a generation's folder: DIR/<policy>/seed-<s>/gen-<n>"),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="where to write the exported model"),
):
    """Export a generation's model to the format its field uses (lm: Hugging Face transformers). OUT must be
    new or an empty folder; it appears whole or not at all."""
    from modelcollapse import paths
    from modelcollapse.families import load_family
    from modelcollapse.store import read_json

    manifest = Path(gen_dir).resolve().parents[2] / "manifest.json" if len(Path(gen_dir).resolve().parents) > 2 else None
    if manifest is None or not manifest.exists():
        raise BadInput(f"export: {gen_dir} is not a generation folder of a run directory (no manifest.json above it)")
    try:
        family = read_json(manifest)["config"]["family"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"export: {manifest} is damaged ({type(e).__name__}: {e})") from None
    spec = load_family(family)
    if spec.export is None:
        raise BadInput(f"export: the {family} family has no export format")
    with paths.staged_dir(out) as staging:
        spec.export(Path(gen_dir), staging)
    typer.echo(f"exported: {out}")


@app.command()
def bench(
    name: str = typer.Argument(..., metavar="NAME", help=f"one of {', '.join(BENCH_NAMES)}"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object a line"),
    quick: bool = typer.Option(False, "--quick", help="a small smoke run (numbers are not meaningful)"),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", min=1, help=THREADS_HELP),
):
    """Ours against the baseline, in one process, interleaved, on the same inputs. What it is timing goes to
    stderr as it goes; the result rows to stdout."""
    set_threads(threads)
    from modelcollapse.bench import run_bench

    for row in run_bench(name, quick=quick):
        if as_json:
            typer.echo(json.dumps(row))
        else:
            typer.echo("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


_received: list[int] = []  # the signal that interrupted this process, once one has


def _interrupt(signum, frame) -> None:
    """SIGINT and SIGTERM (what Slurm and Kubernetes send) both raise KeyboardInterrupt in the main thread,
    so every layer stops, and marks what it was doing `interrupted`, the same way. Only the first does: a
    second signal would cut that clean-up short (kill -9 still ends the process at once)."""
    if not _received:
        _received.append(signum)
        raise KeyboardInterrupt


def _click_errors():
    """The exceptions of the click that typer runs on: its own copy in recent typer, click itself before."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    errors = _click_errors()
    help_error = getattr(errors, "NoArgsIsHelpError", ())  # click >= 8.2: the group's help, shown as it is
    for stream in (sys.stdout, sys.stderr):  # a path given as bytes that are not UTF-8 still prints
        if getattr(stream, "errors", None) == "strict":  # (a UTF-8 locale's surrogateescape prints them as given)
            stream.reconfigure(errors="backslashreplace")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        code = app(standalone_mode=False)  # typer turns a KeyboardInterrupt into exit code 130
    except BadInput as e:
        code = None if _received else _fail(str(e))
    except RunFailed as e:
        code = None if _received else _fail(str(e), 1)
    except help_error as e:
        e.show()
        code = 2
    except errors.UsageError as e:  # a bad option, a missing argument, a bad choice: one line, not a usage box
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        code = _fail(" ".join(e.format_message().split()) + hint)
    except KeyboardInterrupt:
        code = 130
    except OSError as e:  # a full disk: say so in one line; the run stays resumable
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        code = _fail(f"{e.strerror} ({e.filename}); free some space and run the same command again to resume", 1)
    if _received:
        name = signal.Signals(_received[0]).name
        print(f"interrupted ({name}): run the same command again to resume", file=sys.stderr)
        sys.exit(128 + _received[0])
    sys.exit(code or 0)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    main()
